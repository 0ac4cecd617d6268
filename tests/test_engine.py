"""DeepSpeed engine: ds_config generation, schedule, and training steps for every ZeRO stage × precision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train_support import TinyMethod, ToyLoader, tiny_config

from sslmed.config import load_config
from sslmed.errors import ConfigError
from sslmed.train import engine as eng


@pytest.fixture(scope="module")
def info():
    torch.set_num_threads(1)
    return eng.init_distributed()


@pytest.fixture(autouse=True)
def restore_linear():
    """A ZeRO-3 engine swaps in DeepSpeed's memory-efficient F.linear for the rest of the process;
    later tests in this process compare losses bit for bit with fresh processes, so put it back."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def test_ds_config_follows_the_typed_config(tmp_path):
    cfg = load_config(None, ["train.micro_batch=3", "train.grad_accum=4", "train.zero_stage=2",
                             "train.precision=bf16", "optim.grad_clip=0.5"])
    ds = eng.build_ds_config(cfg, world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds  # a torch optimizer is passed in: no JIT-built fused Adam


def test_user_ds_config_is_deep_merged_over_the_generated_one(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}},
                                "gradient_clipping": 2.0}))
    cfg = load_config(None, ["train.zero_stage=3", f"train.ds_config={user}"])
    ds = eng.build_ds_config(cfg, world=1)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["gradient_clipping"] == 2.0
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch


def test_bad_ds_config_and_fp16_on_cpu_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.ds_config: no such file"):
        eng.build_ds_config(load_config(None, [f"train.ds_config={tmp_path / 'none.json'}"]), 1)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        eng.build_ds_config(load_config(None, [f"train.ds_config={broken}"]), 1)
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        eng.build_ds_config(load_config(None, ["train.precision=fp16"]), 1)


def test_lr_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    cfg = load_config(None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4", "train.steps=14"])
    factors = [eng.lr_factor(s, cfg) for s in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def snapshot(engine: eng.Engine) -> dict[str, torch.Tensor]:
    with engine.full_params(frozen_only=False):
        return {k: v.detach().float().clone() for k, v in engine.module.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_training_steps_for_every_zero_stage_and_precision(info, tmp_path, stage, precision):
    cfg = tiny_config(tmp_path, f"train.zero_stage={stage}", f"train.precision={precision}",
                      "train.activation_checkpointing=true", "optim.lr=0.05")
    torch.manual_seed(0)
    engine = eng.build_engine(cfg, TinyMethod(cfg), info)
    assert engine.module.backbone.transformer.checkpointing
    before = snapshot(engine)
    batches = iter(ToyLoader(cfg, 0, 1))
    for step in range(2):
        loss, logs = engine(next(batches))
        assert loss.dtype == eng.DTYPES[precision]
        engine.backward(loss)
        engine.step()
        with engine.full_params():
            engine.module.on_step_end(step + 1, 2)
        assert math.isfinite(float(loss)) and set(logs) == {"loss_recon", "loss_distill"}
        assert math.isfinite(engine.grad_norm()) and engine.grad_norm() > 0
    after = snapshot(engine)
    assert after.keys() == before.keys()
    student = [k for k in before if k.startswith("backbone.")]
    teacher = [k for k in before if k.startswith("teacher.")]
    assert all(not torch.equal(before[k], after[k]) for k in student), "every trained weight moves"
    # the EMA teacher (frozen, partitioned under ZeRO-3) moved too: on_step_end saw full parameters
    assert any(not torch.equal(before[k], after[k]) for k in teacher)
    assert engine.global_step == 2


@pytest.mark.slow
@pytest.mark.parametrize("template", ["zero2-bf16.json", "zero3-bf16-offload.json"])
def test_shipped_ds_config_templates_train(info, tmp_path, template):
    path = Path(__file__).resolve().parent.parent / "launch" / template
    cfg = tiny_config(tmp_path, f"train.ds_config={path}", "optim.lr=0.05")
    engine = eng.build_engine(cfg, TinyMethod(cfg), info)
    offloaded = eng.offloads_optimizer(eng.build_ds_config(cfg, 1))
    assert offloaded == ("offload" in template)
    assert type(engine.ds.client_optimizer).__name__ == ("DeepSpeedCPUAdam" if offloaded else "AdamW")
    before = snapshot(engine)
    batches = iter(ToyLoader(cfg, 0, 1))
    for _ in range(2):
        loss, _ = engine(next(batches))
        engine.backward(loss)
        engine.step()
        assert math.isfinite(float(loss.detach()))
    after = snapshot(engine)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))


def test_grad_accumulation_steps_the_optimizer_once_per_group(info, tmp_path):
    cfg = tiny_config(tmp_path, "train.grad_accum=2")
    engine = eng.build_engine(cfg, TinyMethod(cfg), info)
    batches = iter(ToyLoader(cfg, 0, 1))
    for _ in range(4):
        loss, _ = engine(next(batches))
        engine.backward(loss)
        engine.step()
    assert engine.global_step == 2

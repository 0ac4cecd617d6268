"""The method contract: a method is one file plus one registry entry; teachers stay float32 under bf16;
the loop never waits for the device between log steps."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest
import torch
from test_train_support import TinyMethod, ToyLoader, tiny_config
from torch import nn

from sslmed.config import MethodSettings, load_config, setting
from sslmed.errors import ConfigError
from sslmed.methods import METHODS, build_method
from sslmed.methods.base import Method, Needs, cosine_momentum, step_rng
from sslmed.models import build_backbone
from sslmed.train import checkpoint as ckpt
from sslmed.train import engine as eng
from sslmed.train import loop
from sslmed.train.loop import run_pretraining


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_linear():
    """A ZeRO-3 engine swaps in DeepSpeed's F.linear for the rest of the process; later tests compare
    losses bit for bit with fresh processes, so put it back."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


# ---- a new method: one class with its settings and needs, one registry entry ---------------------


@dataclass
class DenoiseSettings(MethodSettings):
    noise: float = setting(0.1, lambda v: v >= 0, ">= 0")  # std of the noise added to the input


class Denoise(Method):
    """Reconstructs each crop's mean intensity from a noisy copy: enough to train through the loop."""

    name = "denoise"
    Settings = DenoiseSettings
    needs = Needs(backbone="vit3d")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        self.head = nn.Linear(self.backbone.feature_dim, 1)

    def forward(self, batch: dict):
        x = batch["image"]
        noise = torch.randn(x.shape, generator=step_rng(batch), device=x.device, dtype=x.dtype)
        pred = self.head(self.backbone(x + self.settings.noise * noise)).squeeze(1)
        loss = (pred - x.mean(dim=(1, 2, 3, 4))).pow(2).mean()
        return loss, {"loss_denoise": loss.detach()}


TINY = ["data.crop_size=16", "model.patch_size=8", "model.dim=24", "model.depth=1", "model.heads=2",
        "train.micro_batch=2", "optim.warmup_steps=1"]


def test_a_registered_toy_method_is_configured_validated_and_trained(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "denoise", Denoise)
    yaml = tmp_path / "denoise.yaml"
    yaml.write_text(f"base: _tiny\nrun:\n  dir: {tmp_path / 'run'}\nmethod:\n  name: denoise\n  noise: 0.3\n"
                    "train:\n  steps: 2\ncheckpoint:\n  every: 0\n")
    cfg = load_config(str(yaml), TINY)
    assert isinstance(cfg.method, DenoiseSettings) and cfg.method.noise == 0.3
    for wrong in ("method.mask_ratio=0.5", "method.nose=1"):
        with pytest.raises(ConfigError, match="method 'denoise' has no setting .*; its settings: noise$"):
            load_config(str(yaml), [*TINY, wrong])
    with pytest.raises(ConfigError, match="'method.noise' must be >= 0"):
        load_config(str(yaml), [*TINY, "method.noise=-1"])
    with pytest.raises(ConfigError, match="method 'denoise' needs model.arch: vit3d"):
        build_method(load_config(str(yaml), [*TINY, "model.arch=cnn3d"]))

    run = run_pretraining(cfg, build_method, ToyLoader)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss_denoise"] == pytest.approx(r["loss"]) for r in records)
    assert (run / "encoder.safetensors").is_file()


# ---- teachers: float32 under bf16, saved as float32 -----------------------------------------------


class Position:
    """A loader stand-in for restore(): a position to load."""

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class GridToy(Denoise):
    name = "gridtoy"
    needs = Needs(backbone="vit3d", grid=True)


def test_a_method_that_needs_the_atlas_grid_refuses_random_sampling_in_one_line(monkeypatch):
    monkeypatch.setitem(METHODS, "gridtoy", GridToy)
    monkeypatch.setitem(METHODS, "denoise", Denoise)
    with pytest.raises(ConfigError) as error:
        build_method(load_config("_tiny", [*TINY, "method.name=gridtoy"]))
    assert str(error.value) == ("method 'gridtoy' contrasts subjects at one atlas grid point per batch: "
                                "set data.sampling: atlas_grid (got 'random')")
    assert "data.sampling=atlas_grid" in GridToy.needs.overrides()
    built = build_method(load_config("_tiny", [*TINY, "method.name=gridtoy", "data.sampling=atlas_grid"]))
    assert isinstance(built, GridToy)
    # a method without the need takes either sampling
    assert isinstance(build_method(load_config("_tiny", [*TINY, "method.name=denoise",
                                                         "data.sampling=atlas_grid"])), Denoise)


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_teacher_is_the_fp32_ema_of_the_online_weights_and_is_saved_in_fp32(tmp_path, stage):
    info = eng.init_distributed()
    cfg = load_config("byol-tiny", [*TINY, f"run.dir={tmp_path}", "train.precision=bf16", "optim.lr=0.05",
                                    f"train.zero_stage={stage}",
                                    "method.hidden_dim=16", "method.proj_dim=8", "method.ema_momentum=0.9",
                                    "train.steps=1000"])
    torch.manual_seed(0)
    engine = eng.build_engine(cfg, build_method(cfg), info)
    method = engine.module
    online = method.online()
    with engine.full_params():  # under ZeRO-3 the online weights are shards outside these blocks
        assert all(p.dtype == torch.bfloat16 for p in online.parameters()), "the engine cast them"
        bf16 = [p.detach().clone() for p in online.parameters()]
    # references computed alongside from the same online weights: in float32 (from the initial float32
    # weights the teacher copied), and in bf16, as the teacher was kept when the engine cast it too
    fp32 = [p.detach().clone() for p in method.teacher.module.parameters()]
    assert all(r.dtype == torch.float32 for r in fp32)
    batches = iter(ToyLoader(cfg, 0, 1))
    steps = 6
    for step in range(1, steps + 1):
        batch = next(batches)
        loss, _ = engine({**batch, "image2": batch["image"].flip(2)})
        engine.backward(loss)
        engine.step()
        m = cosine_momentum(0.9, step, cfg.train.steps)
        with engine.full_params():
            method.on_step_end(step, cfg.train.steps)
            for r, h, o in zip(fp32, bf16, online.parameters(), strict=True):
                r.mul_(m).add_(o.detach().float(), alpha=1 - m)
                h.mul_(m).add_(o.detach(), alpha=1 - m)
    teacher = list(method.teacher.module.parameters())
    assert all(t.dtype == torch.float32 for t in teacher)
    # the same float32 arithmetic in the same order: equal to the last bit
    assert all(torch.equal(t, r) for t, r in zip(teacher, fp32, strict=True))
    worst_bf16 = max(((h.float() - r).abs().max() / r.abs().max()).item()
                     for h, r in zip(bf16, fp32, strict=True))
    assert worst_bf16 > 1e-3, "a bf16 EMA would have drifted from the float32 one"

    saved = ckpt.save_checkpoint(engine, tmp_path, steps, {"position": steps}, cfg)
    state = torch.load(saved / ckpt.TEACHERS, weights_only=True)
    assert state and all("teacher" in k and v.dtype == torch.float32 for k, v in state.items())
    assert set(ckpt.load_extras(ckpt.read_checkpoint(saved), 0)) == {"loader", "step"}  # no RNG state

    torch.manual_seed(1)  # another initial teacher: restore must bring back the saved one
    fresh = eng.build_engine(cfg, build_method(cfg), info)
    ckpt.restore(fresh, ckpt.read_checkpoint(saved), Position())
    restored = list(fresh.module.teacher.module.parameters())
    assert all(t.dtype == torch.float32 and torch.equal(t, r) for t, r in zip(restored, teacher, strict=True))


# ---- no host syncs between log steps --------------------------------------------------------------

SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.mark.parametrize("name,extra,uncounted", [
    ("sssd-tiny", [], ("/torch/optim/",)),
    # ZeRO-1/2 check the gradients for overflow on the host every step: DeepSpeed's own reads
    ("byol-tiny", ["train.precision=bf16", "train.zero_stage=2"], ("/torch/optim/", "/deepspeed/")),
])
def test_no_host_syncs_between_log_steps(name, extra, uncounted, tmp_path, monkeypatch):
    """A real tiny run through the DeepSpeed engine (SSSD: masks and an EMA teacher; BYOL under bf16: a
    float32 teacher under autocast): every call that makes the host wait for a tensor's value is counted,
    per step, outside the loader."""
    counts: dict[int, list[str]] = {}
    where = {"step": 0, "loader": False}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            # torch's Adam keeps its step count in a host tensor whatever the device: reading it waits for
            # nothing, so calls from torch.optim are not counted
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if not where["loader"] and not any(part in caller for part in uncounted):
                counts.setdefault(where["step"], []).append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for read in SYNCS:
        monkeypatch.setattr(torch.Tensor, read, counting(read, getattr(torch.Tensor, read)))

    accumulate = loop.accumulate

    def tracked(engine, batches, meter, cfg, step):
        where["step"] = step
        return accumulate(engine, batches, meter, cfg, step)

    monkeypatch.setattr(loop, "accumulate", tracked)

    class Quiet(ToyLoader):  # the data pipeline runs on the host: its own tensor reads are not counted
        def __iter__(self):
            batches = super().__iter__()
            while True:
                where["loader"] = True
                batch = next(batches)
                where["loader"] = False
                yield {**batch, "image2": batch["image"].flip(2)}

    cfg = load_config(name, [*TINY, *extra, f"run.dir={tmp_path}", "train.steps=7", "train.log_every=3",
                             "checkpoint.every=0"])
    run_pretraining(cfg, build_method, Quiet)
    sync_points = {3, 6, 7}  # log steps (and the final checkpoint)
    assert all(counts.get(step, []) == [] for step in range(1, 8) if step not in sync_points), counts
    assert all(counts.get(step) for step in sync_points), "the counter sees the reads at log steps"


def test_a_non_finite_loss_is_caught_at_the_next_sync_point_before_any_checkpoint(tmp_path):
    class Poisoned(ToyLoader):
        def __iter__(self):
            for batch in super().__iter__():
                if self.position == 2:  # the batch of step 2
                    batch["image"] = torch.full_like(batch["image"], float("nan"))
                yield batch

    cfg = tiny_config(tmp_path, "train.steps=8", "train.log_every=4", "checkpoint.every=3")
    with pytest.raises(FloatingPointError, match="loss is not finite at step 2"):
        run_pretraining(cfg, TinyMethod, Poisoned)
    assert ckpt.complete_checkpoints(tmp_path) == []  # step 3's checkpoint was never written

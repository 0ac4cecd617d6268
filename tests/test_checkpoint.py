"""Checkpoints across world sizes (2 ranks under torchrun → 1 rank), and encoder export / load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from test_train import metrics, overrides, subprocess_env

from sslmed import load_encoder
from sslmed.cli import main
from sslmed.config import load_config, save_config
from sslmed.errors import CheckpointError
from sslmed.methods import build_method
from sslmed.train import checkpoint as ckpt
from sslmed.train import engine as eng


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def two_rank_run(packed_wds, tmp_path_factory):
    """SimCLR (negatives gathered across ranks), ZeRO-2, bf16, 2 processes under torchrun."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    args = overrides(packed_wds, run, "train.steps=4", "checkpoint.every=2", "train.zero_stage=2",
                     "train.precision=bf16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(eng.free_port()), "-m", "sslmed", "pretrain", "simclr-tiny",
           *args]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, args


@pytest.mark.slow
def test_two_process_zero2_bf16_run(two_rank_run):
    run, _ = two_rank_run
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert all(r["samples_per_s"] > 0 for r in metrics(run))
    latest = ckpt.complete_checkpoints(run)[-1]
    assert (latest.step, latest.world, latest.zero_stage) == (4, 2, 2)
    # each rank wrote its optimizer partition and its own data position
    assert sorted(p.name for p in latest.path.glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for rank in (0, 1):
        extras = ckpt.load_extras(latest, rank)
        assert extras["step"] == 4 and extras["loader"]["layout"]["rank"] == rank
    assert (run / "encoder.safetensors").is_file()


@pytest.mark.slow
def test_resume_on_one_rank_from_a_two_rank_checkpoint(two_rank_run):
    run, args = two_rank_run
    latest = ckpt.complete_checkpoints(run)[-1]
    saved = ckpt.export_run(run, run.parent / "from-2-ranks.safetensors")  # consolidated fp32 masters

    # the re-sliced (universal) state loads into one rank: the weights are the saved ones
    cfg = load_config("simclr-tiny", args)
    info = eng.init_distributed()
    engine = eng.build_engine(cfg, build_method(cfg), info, universal=ckpt.needs_universal(latest, 1))
    assert ckpt.restore(engine, latest, loader=None) is None  # data position does not carry over
    expected = load_encoder(saved).state_dict()
    for name, value in engine.module.encoder().state_dict().items():
        torch.testing.assert_close(value.float(), expected[name], rtol=1e-2, atol=1e-3)  # bf16 copy
    del engine

    # and training continues from step 4 with the saved schedule
    assert main(["pretrain", "simclr-tiny", *args[:-4], "train.steps=6", "checkpoint.every=2",
                 "train.zero_stage=2", "train.precision=bf16"]) == 0
    lines = metrics(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    saved_epoch = ckpt.load_extras(latest, 0)["loader"]["epoch"]
    assert lines[4]["epoch"] >= saved_epoch + 1  # the one rank's stream begins at the next epoch
    assert lines[4]["lr"] == pytest.approx(cfg.optim.lr * eng.lr_factor(4, load_config(
        "simclr-tiny", [*args, "train.steps=6"])), rel=1e-6)
    assert ckpt.complete_checkpoints(run)[-1].world == 1


def test_exported_encoder_gives_the_in_memory_features(packed_wds, tmp_path):
    cfg = load_config("mae-tiny", overrides(packed_wds, tmp_path / "run", "train.steps=2"))
    info = eng.init_distributed()
    torch.manual_seed(0)
    engine = eng.build_engine(cfg, build_method(cfg), info)
    x = torch.rand(3, 1, 16, 16, 16)
    loss, _ = engine({"image": x})
    engine.backward(loss)
    engine.step()  # weights no longer at their initial values
    encoder = engine.module.encoder().eval()
    path = ckpt.export_encoder(encoder, tmp_path / "enc.safetensors", ckpt.encoder_meta(cfg))
    loaded = load_encoder(path)
    assert type(loaded) is type(encoder)
    with torch.no_grad():
        expected, got = encoder(x), loaded(x)
    assert got.shape == (3, encoder.feature_dim)
    assert torch.equal(got, expected)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["config_digest"] == cfg.digest() and sidecar["kwargs"]["dim"] == 48


def test_load_encoder_refuses_missing_or_mismatched_files(packed_wds, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "none.safetensors")
    cfg = load_config("mae-tiny", overrides(packed_wds, tmp_path / "run"))
    encoder = build_method(cfg).encoder()
    path = ckpt.export_encoder(encoder, tmp_path / "enc.safetensors", {})
    sidecar = path.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "kwargs": {**info["kwargs"], "dim": 24, "heads": 2}}))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_encoder(path)
    sidecar.write_text(json.dumps({**info, "arch": "nonesuch"}))
    with pytest.raises(CheckpointError, match="not a valid exported encoder"):
        load_encoder(path)
    sidecar.write_text(json.dumps(info))
    path.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="not a valid exported encoder"):
        load_encoder(path)
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="do not match"):
        load_encoder(path)


def test_resume_choices(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    assert ckpt.find_resume(cfg, tmp_path) is None  # auto with nothing saved: a fresh start
    step = tmp_path / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "complete").write_text(json.dumps({"step": 3, "world": 2, "zero_stage": 3}))
    save_config(cfg, step / "config.yaml")
    assert ckpt.find_resume(cfg, tmp_path).step == 3
    cfg.checkpoint.resume = "none"  # a new run would mix with this one's checkpoints
    with pytest.raises(CheckpointError, match="already holds another run's checkpoints"):
        ckpt.find_resume(cfg, tmp_path)
    assert ckpt.find_resume(cfg, tmp_path / "elsewhere") is None
    cfg.checkpoint.resume = str(step)
    found = ckpt.find_resume(cfg, tmp_path)
    assert (found.step, found.world, found.zero_stage) == (3, 2, 3)
    assert ckpt.needs_universal(found, 1) and not ckpt.needs_universal(found, 2)
    cfg.checkpoint.resume = str(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        ckpt.find_resume(cfg, tmp_path)
    (step / "complete").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable checkpoint marker"):
        ckpt.read_checkpoint(step)

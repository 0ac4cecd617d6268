"""End to end: `sslmed pretrain` with the real MAE / SimCLR methods and loader on packed phantoms."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_support import TinyMethod, ToyLoader, tiny_config

import sslmed
from sslmed.cli import main
from sslmed.errors import DataError
from sslmed.models.vit3d import to_monai_vit
from sslmed.train import checkpoint as ckpt
from sslmed.train import engine as eng
from sslmed.train.loop import run_pretraining

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.crop_size=16", "data.workers=0", "data.crops_per_volume=2", "data.shuffle_buffer=4"]


def overrides(data: Path, run: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", f"run.dir={run}", *SMALL, *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # the same arithmetic as the single-thread subprocesses, bit for bit


def test_pretrain_writes_metrics_tensorboard_checkpoints_and_encoder(packed_wds, tmp_path):
    run = tmp_path / "run"
    code = main(["pretrain", "mae-tiny", *overrides(packed_wds, run, "train.steps=3", "checkpoint.every=2")])
    assert code == 0
    lines = metrics(run)
    assert [r["step"] for r in lines] == [1, 2, 3]
    for record in lines:
        for key in ("loss", "loss_recon", "lr", "grad_norm", "samples_per_s", "voxels_per_s", "peak_mem_mb"):
            assert torch.isfinite(torch.tensor(record[key])), key
        assert record["voxels_per_s"] == pytest.approx(record["samples_per_s"] * 16**3)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"loss/loss", "loss/loss_recon", "train/lr", "train/grad_norm", "throughput/samples_per_s",
            "throughput/voxels_per_s", "train/peak_mem_mb"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss/loss")] == [1, 2, 3]
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_2", "step_3"]
    info = json.loads((run / "encoder.json").read_text())
    assert info["arch"] == "vit3d" and info["crop_size"] == 16 and info["axis_order"].startswith("XYZ")
    assert info["normalisation"]["modality"] and "spacing" in info

    # the checkpoint holds the same weights as the encoder exported from memory at the end
    exported = ckpt.export_run(run, tmp_path / "again.safetensors")
    a, b = load_file(str(run / "encoder.safetensors")), load_file(str(exported))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the exported weights in MONAI's ViT: its tokens, averaged, are the encoder's features
    encoder = sslmed.load_encoder(run / "encoder.safetensors").eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        tokens, _ = to_monai_vit(encoder, 16).eval()(x)
        assert torch.allclose(tokens.mean(dim=1), encoder(x), atol=1e-5)


@pytest.mark.slow
def test_compiled_training_follows_the_eager_losses(packed_wds, tmp_path, monkeypatch):
    import torch._inductor.config

    # compiled code draws its own random numbers unless told to call torch's: the same masks as eager
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        assert main(["pretrain", "mae-tiny", *overrides(packed_wds, run, "train.steps=3",
                                                        f"train.compile={str(compiled).lower()}")]) == 0
        losses[compiled] = [r["loss"] for r in metrics(run)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)  # inductor's fusions reorder float sums


def test_user_errors_are_one_line_messages(packed_wds, tmp_path, capsys):
    assert main(["pretrain", "mae-tiny", *overrides(tmp_path / "absent", tmp_path / "r1")]) == 2
    assert "absent" in capsys.readouterr().err
    nothing = "data.filter_tags={status: nope}"
    code = main(["pretrain", "mae-tiny", *overrides(packed_wds, tmp_path / "r2", nothing)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sslmed: error:") and "Traceback" not in err

    run = tmp_path / "r3"
    assert main(["pretrain", "mae-tiny", *overrides(packed_wds, run, "train.steps=1")]) == 0
    capsys.readouterr()
    assert main(["pretrain", "mae-tiny", *overrides(packed_wds, run, "train.steps=2", "model.dim=24")]) == 2
    err = capsys.readouterr().err
    assert "different model configuration" in err and "model.dim: 48 → 24" in err
    other_stage = overrides(packed_wds, run, "train.steps=2", "train.zero_stage=2")
    assert main(["pretrain", "mae-tiny", *other_stage]) == 2
    assert "resume with train.zero_stage=0" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_losses(packed_wds, tmp_path):
    schedule = ["train.steps=30", "checkpoint.every=2", "checkpoint.keep=3"]
    assert main(["pretrain", "mae-tiny", *overrides(packed_wds, tmp_path / "full", *schedule)]) == 0
    reference = [r["loss"] for r in metrics(tmp_path / "full")]

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sslmed", "pretrain", "mae-tiny", *overrides(packed_wds, run, *schedule)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not list((run / "checkpoints").glob("step_*/complete")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in metrics(run))
    assert killed_at < 30, "the run was killed before it finished"

    assert main(["pretrain", "mae-tiny", *overrides(packed_wds, run, *schedule)]) == 0
    resumed = [r["loss"] for r in metrics(run)]
    assert [r["step"] for r in metrics(run)] == list(range(1, 31))
    assert resumed == reference  # fp32 on CPU: bit for bit


def test_incomplete_checkpoints_are_ignored_by_resume_auto(tmp_path):
    info = eng.init_distributed()
    run = tmp_path / "run"
    run_pretraining(tiny_config(run, "train.steps=4", "checkpoint.keep=5"), TinyMethod, ToyLoader)
    reference = [r["loss"] for r in metrics(run)]
    root = run / "checkpoints"
    # a kill while step 6 was being written, and a step_8 whose marker never landed
    (root / "tmp-step_6").mkdir()
    (root / "tmp-step_6" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (root / "step_8").mkdir()
    found = ckpt.find_resume(tiny_config(run), run)
    assert found is not None and found.step == 4
    with pytest.raises(ckpt.CheckpointError, match="interrupted while being written"):
        ckpt.read_checkpoint(root / "step_8")

    # losing step 4 as well: resume from step 2 must redo steps 3-4 exactly
    shutil.rmtree(root / "step_4")
    run_pretraining(tiny_config(run, "train.steps=4", "checkpoint.keep=5"), TinyMethod, ToyLoader)
    assert [r["loss"] for r in metrics(run)] == reference
    assert info.world == 1


def test_sigterm_checkpoints_and_stops_cleanly(tmp_path):
    class Preempted(ToyLoader):
        def __iter__(self):
            for batch in super().__iter__():
                if self.position == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    run = tmp_path / "run"
    run_pretraining(tiny_config(run, "train.steps=8", "checkpoint.every=100"), TinyMethod, Preempted)
    assert [c.step for c in ckpt.complete_checkpoints(run)] == [3]
    assert not (run / "encoder.safetensors").exists()  # unfinished: nothing exported
    run_pretraining(tiny_config(run, "train.steps=8", "checkpoint.every=100"), TinyMethod, ToyLoader)
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    assert (run / "encoder.safetensors").is_file()


def test_empty_stream_is_a_data_error(tmp_path):
    class Empty(ToyLoader):
        def __iter__(self):
            return iter(())

    with pytest.raises(DataError, match="yields no samples"):
        run_pretraining(tiny_config(tmp_path / "run"), TinyMethod, Empty)

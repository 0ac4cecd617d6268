"""Hostile or damaged inputs on shared machines: nothing a file says is executed, nothing is lost
without a word."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import TinyMethod, ToyLoader, tiny_config

from sslmed.cli import main
from sslmed.data.sources import SkipCounter, open_dataset, open_shard_url
from sslmed.errors import CheckpointError, DataError
from sslmed.train import checkpoint as ckpt
from sslmed.train import engine as eng
from sslmed.train.loop import run_pretraining


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


class RunsCode:
    """Unpickling this runs `touch <path>`: what a crafted checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


# ---- shard names never reach a shell ------------------------------------------------------------


def test_a_shard_name_from_the_manifest_never_reaches_a_shell(packed_wds, tmp_path, capsys):
    marker = tmp_path / "injected"
    node = tmp_path / "node"
    node.mkdir()
    manifest = json.loads((packed_wds / "manifest.json").read_text())
    manifest["shards"][0]["path"] = f"shard-000000.tar; touch {marker}; cat /dev/null #"
    (node / "manifest.json").write_text(json.dumps(manifest))
    for url in (f"pipe:cat {packed_wds}/{{shard}}", f"pipe:cat {packed_wds}/{{shard}} | cat"):
        with pytest.raises(DataError, match=r"shards\[0\]\.path .*not a shard name"):
            open_dataset(node, url)
    assert main(["verify", str(node)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(DataError, match="not a shard name"):  # whoever calls the opener
        open_shard_url(f"pipe:cat {packed_wds}/{{shard}}", f"x; touch {marker}")
    assert not marker.exists()


@pytest.mark.parametrize("template", ["pipe:cat {dir}/{{shard}}",  # an argument list, no shell
                                      "pipe:cat {dir}/{{shard}} | cat"])  # a pipeline: shell, name quoted
def test_shard_urls_stream_with_and_without_a_shell(packed_wds, tmp_path, template):
    node = tmp_path / "node"
    node.mkdir()
    shutil.copy(packed_wds / "manifest.json", node)
    dataset, skips = open_dataset(node, template.format(dir=packed_wds)), SkipCounter()
    seen = [s.key for unit in dataset.units for s in dataset.samples(unit, skips)]
    assert seen == open_dataset(packed_wds).keys and skips.as_dict() == {"shards": 0, "samples": 0}


# ---- checkpoints load without running code -----------------------------------------------------


def trained_run(run: Path, *overrides: str) -> ckpt.Checkpoint:
    cfg = tiny_config(run, "train.steps=2", "checkpoint.every=2", *overrides)
    run_pretraining(cfg, TinyMethod, ToyLoader)
    return ckpt.complete_checkpoints(run)[-1]


def plant(state_file: Path, marker: Path) -> None:
    state = torch.load(state_file, weights_only=False)
    state["payload"] = RunsCode(marker)
    torch.save(state, state_file)


def test_a_crafted_zero0_checkpoint_runs_no_code_on_resume_or_export(tmp_path, capsys):
    marker = tmp_path / "ran"
    latest = trained_run(tmp_path / "run")
    plant(latest.path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"refused to load: .*GLOBAL posix.system"):
        run_pretraining(tiny_config(tmp_path / "run", "train.steps=4"), TinyMethod, ToyLoader)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "enc.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "enc.safetensors").exists()
    # checkpoint.trust lifts the restriction, as documented (unsafe)
    eng.consolidated_state_dict(latest.path.parent, latest.tag, 0, trust=True)
    assert marker.exists()


def test_a_crafted_zero1_checkpoint_runs_no_code_on_export_or_universal_conversion(tmp_path):
    marker = tmp_path / "ran"
    latest = trained_run(tmp_path / "run", "train.zero_stage=1", "train.precision=bf16")
    # DeepSpeed's own states pass the allow-list: consolidation and re-slicing work as before
    whole = eng.consolidated_state_dict(latest.path.parent, latest.tag, 1)
    trained = {n for n, p in TinyMethod(tiny_config(tmp_path)).named_parameters() if p.requires_grad}
    assert trained <= set(whole)
    eng.to_universal(latest.path, tmp_path / "universal")
    assert any((tmp_path / "universal").rglob("fp32.pt"))
    optim = next(latest.path.glob("*optim_states.pt"))
    plant(optim, marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        eng.consolidated_state_dict(latest.path.parent, latest.tag, 1)
    with pytest.raises(CheckpointError, match="refused to load"):
        eng.to_universal(latest.path, tmp_path / "universal-2")
    assert not marker.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))

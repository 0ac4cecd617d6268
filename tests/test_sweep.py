"""Ray Tune sweep on CPU: real pack → MAE pretraining (once per mask ratio) → linear probes → reports.

One Ray session for the module (starting Ray takes ~20 s here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sslmed.config import load_config
from sslmed.eval.sweep import PRETRAIN_LOG, absolute_paths, run_pretraining, sweep

pytestmark = pytest.mark.slow

TINY = ["model.dim=32", "model.depth=2", "model.heads=2", "model.patch_size=8", "data.crop_size=16",
        "method.decoder_dim=16", "method.decoder_depth=1", "data.shuffle_buffer=4", "train.micro_batch=4",
        "sweep.pretrain_steps=2", "eval.seeds=[0]", "eval.mode=linear", "sweep.cpus_per_trial=1"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """16 labelled volumes (label = stripe orientation), packed with `sslmed pack` and a tags CSV."""
    from sslmed.io.pack import pack

    root = tmp_path_factory.mktemp("sweepdata")
    rng = np.random.default_rng(0)
    (root / "src").mkdir()
    with open(root / "tags.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for i in range(16):
            volume = rng.normal(0.0, 0.5, (16, 16, 16)).astype(np.float32)
            volume[(slice(None, None, 4),) if i % 2 else (slice(None), slice(None, None, 4))] += 1.5
            np.save(root / "src" / f"s{i:02d}.npy", volume)
            writer.writerow([f"s{i:02d}.npy", "ab"[i % 2]])
    assert pack([root / "src"], root / "packed", tags=root / "tags.csv")["ok"] == 16
    return root / "packed"


@pytest.fixture(scope="module")
def ray_session():
    import shutil

    import ray

    from sslmed.eval.sweep import start_local_ray

    temp_dir = start_local_ray(num_cpus=2)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def sweep_config(packed: Path, out: Path, *extra: str):
    return load_config("sweep-tiny", [*TINY, f"data.path={packed}", f"eval.data={packed}", f"sweep.out={out}",
                                      *extra])


def pretrain_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pretrain" / PRETRAIN_LOG).read_text().splitlines()]


def test_sweep_pretrains_once_per_ratio_and_records_failures(tmp_path, packed, ray_session, capsys):
    out = tmp_path / "sweep"
    # 0.5 twice must not pretrain twice; 1.0 is an invalid mask ratio: its trials fail, the sweep goes on.
    cfg = sweep_config(packed, out, "sweep.mask_ratios=[0.5,0.75,0.5,1.0]", "eval.label_fractions=[0.5,1.0]",
                       "sweep.include_random=true")
    assert sweep(cfg) == out.resolve()
    results = pd.read_csv(out / "results.csv").set_index("trial")
    assert len(results) == 3 * 2 + 2, results.to_string()  # 3 distinct ratios + random init, × 2 fractions
    ok = results[results["status"] == "ok"]
    assert sorted(zip(ok["encoder"], ok["mask_ratio"].fillna(-1), ok["label_fraction"], strict=True)) == [
        ("pretrained", 0.5, 0.5), ("pretrained", 0.5, 1.0), ("pretrained", 0.75, 0.5),
        ("pretrained", 0.75, 1.0), ("random", -1, 0.5), ("random", -1, 1.0)]
    assert (ok["balanced_accuracy"] > 0.5).all() and (ok["n_labelled"] > 0).all()
    for fraction in (0.5, 1.0):
        failed = results.loc[f"mask1.0-frac{fraction}-seed0"]
        assert failed["status"] == "failed" and "mask_ratio" in failed["error"], failed["error"]

    assert sorted(e["mask_ratio"] for e in pretrain_log(out)) == [0.5, 0.75]  # once per distinct ratio
    table = (out / "results.md").read_text()
    assert table in capsys.readouterr().out
    for label in ("mask ratio 0.5", "mask ratio 0.75", "random init", "Failed trials"):
        assert label in table
    for png in ("balanced_accuracy_vs_label_fraction.png", "auroc_vs_label_fraction.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A re-run finds both encoders in the cache and launches no pretraining trial (nor pretrains).
    base = absolute_paths(cfg).to_dict()
    encoders = run_pretraining(cfg, base, [0.75, 0.5], out)
    assert {r: Path(e["encoder"]).parent.parent for r, e in encoders.items()} == {0.5: out / "pretrain",
                                                                                  0.75: out / "pretrain"}
    assert len(pretrain_log(out)) == 2
    assert len(list((out / "tune").glob("pretrain-*"))) == 1  # the first sweep's pretraining phase only

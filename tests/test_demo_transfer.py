"""`sslmed demo sweep-transfer`: every method from its own config with one shared budget, probed across
subjects against the same architecture at random init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sslmed.config import load_config
from sslmed.demo_transfer import CROP_SIZE, METHODS, method_config, results_table, run_sweep_transfer
from sslmed.errors import ConfigError
from sslmed.methods import METHODS as REGISTERED
from sslmed.methods import build_method


def test_the_sweep_covers_every_registered_method():
    assert set(METHODS) == set(REGISTERED)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_gets_the_same_budget_and_the_recipes_augmentation(tmp_path, name):
    cfg = method_config(name, "tiny", tmp_path, tmp_path / "pool", steps=40, micro_batch=6)
    own = load_config(f"{name}-tiny")
    assert cfg.method.name == name and cfg.model.arch == own.model.arch  # the method's own architecture
    assert (cfg.data.crop_size, cfg.train.steps, cfg.train.micro_batch, cfg.optim.warmup_steps) == \
        (CROP_SIZE, 40, 6, 4)
    assert cfg.data.augment_families == load_config("brain-mri-cpu").data.augment_families
    assert "flip" not in cfg.data.augment_families
    if name == "drasclr":  # its queues are sized by the pool's atlas grid, and no pool is packed here
        cfg = method_config(name, "tiny", tmp_path, tmp_path / "pool", steps=40, micro_batch=6,
                            extra=("method.locations=4",))
    method = build_method(cfg)  # the shared crop size fits every method's model
    assert sum(p.numel() for p in method.encoder().parameters()) > 0


def fake_summary(means: dict[float, float], std: float) -> dict:
    """As `summarise` gives it; 100 % of the labels has no spread (every seed trains on the same crops)."""
    return {str(f): {"balanced_accuracy": {"mean": m, "std": 0.0 if f == 1.0 else std, "n": 3}}
            for f, m in means.items()}


def test_the_table_reports_each_difference_and_marks_only_those_beyond_the_spread():
    results = {"steps": 10, "micro_batch": 2, "family": "tiny", "crop_size": 32, "n_train": 9, "n_test": 9,
               "methods": {
                   "a": {"arch": "vit3d", "pretrain_seconds": 1.0, "pretrain_cpu_seconds": 2.0, "summaries": {
                       "pretrained": fake_summary({0.01: 0.615, 0.1: 0.70, 1.0: 0.65}, 0.01),
                       "random-init": fake_summary({0.01: 0.60, 0.1: 0.60, 1.0: 0.60}, 0.01),
                       "intensity-only": fake_summary({0.01: 0.4, 0.1: 0.4, 1.0: 0.4}, 0.0)}}}}
    row = next(line for line in results_table(results).splitlines() if line.startswith("| a |"))
    assert "**+0.100**" in row  # 0.1 apart, spreads 0.02 together
    assert "| +0.015 |" in row  # at 1 %: within the spreads
    assert "| +0.050 |" in row  # at 100 %: no spread to exceed


def test_unknown_methods_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown methods"):
        run_sweep_transfer(tmp_path, methods=("mae", "nonesuch"))
    assert not (tmp_path / "unlabeled").exists()


def test_quick_sweep_probes_each_method_against_its_random_init(tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "sweep"
    results = run_sweep_transfer(out, steps=2, micro_batch=2, methods=("mae", "spark"), quick=True)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["mae", "spark"]
    assert [saved["methods"][m]["arch"] for m in ("mae", "spark")] == ["vit3d", "cnn3d"]
    assert saved["n_train"] == saved["n_test"] == 300  # one crop per ROI on each brain in quick mode
    for entry in saved["methods"].values():
        assert set(entry["summaries"]) == {"pretrained", "random-init", "intensity-only"}
        assert {float(f) for f in entry["summaries"]["pretrained"]} == {0.01, 0.1, 1.0}
        assert all(0.0 <= s["balanced_accuracy"]["mean"] <= 1.0
                   for s in entry["summaries"]["pretrained"].values())
    # the two methods' random-init encoders differ (own architectures), the intensity baseline does not
    mae, spark = (saved["methods"][m]["summaries"] for m in ("mae", "spark"))
    assert mae["intensity-only"] == spark["intensity-only"]
    assert (out / "results.png").stat().st_size > 0
    assert "| spark | cnn3d |" in (out / "results.md").read_text()
    assert results["methods"].keys() == saved["methods"].keys()
    tags = (out / "pool-tags.csv").read_text().splitlines()
    assert tags[0] == "path,status" and len(tags) == 4  # the residual method's normal volumes
    assert np.isfinite(saved["seconds"])

"""Sweep bookkeeping without Ray: trial grid, pretraining digest, mean ± std tables and plots."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sslmed.config import load_config
from sslmed.eval.sweep import evaluation_trials, pretrain_digest, trial_config
from sslmed.eval.sweep_report import write_reports

METRICS = ("balanced_accuracy", "auroc")


def test_trial_grid_covers_ratios_fractions_seeds_and_random_baseline():
    cfg = load_config("sweep-tiny", ["eval.label_fractions=[0.1,1.0]", "eval.seeds=[0,1,2]"])
    trials = evaluation_trials(cfg, [0.5, 0.75])
    assert len(trials) == 2 * 2 * 3 + 2 * 3
    assert sum(t["encoder"] == "random" for t in trials) == 6
    assert len({tuple(sorted(t.items())) for t in trials}) == len(trials)
    cfg.sweep.include_random = False
    assert all(t["encoder"] == "pretrained" for t in evaluation_trials(cfg, [0.5]))


def test_pretrain_digest_depends_on_pretraining_settings_only():
    base = load_config("sweep-tiny").to_dict()
    reference = pretrain_digest(trial_config(base, {"method.mask_ratio": 0.5}))
    same = trial_config(base, {"method.mask_ratio": 0.5, "run.dir": "/elsewhere", "eval.seeds": [7],
                               "sweep.cpus_per_trial": 2.0})
    assert pretrain_digest(same) == reference
    assert pretrain_digest(trial_config(base, {"method.mask_ratio": 0.75})) != reference
    assert pretrain_digest(trial_config(base, {"method.mask_ratio": 0.5, "train.steps": 3})) != reference


def row(encoder, ratio, fraction, seed, value, status="ok"):
    metrics = {m: value for m in METRICS} if status == "ok" else {}
    name = f"{encoder}{ratio}-frac{fraction}-seed{seed}"
    return {"trial": name, "label_fraction": fraction, "mask_ratio": ratio, "seed": seed, "encoder": encoder,
            "status": status, "error": "" if status == "ok" else "ValueError: boom", **metrics}


def test_reports_mean_std_over_seeds_and_failed_trials(tmp_path):
    rows = [row("pretrained", 0.5, 0.1, 0, 0.6), row("pretrained", 0.5, 0.1, 1, 0.8),
            row("pretrained", 0.5, 1.0, 0, 0.9), row("pretrained", 0.5, 1.0, 1, 0.0, status="failed"),
            row("random", None, 0.1, 0, 0.5), row("random", None, 1.0, 0, 0.7)]
    text = write_reports(rows, tmp_path, METRICS)
    std = math.sqrt(((0.6 - 0.7) ** 2 + (0.8 - 0.7) ** 2) / 1)  # sample std over the two seeds
    assert f"| mask ratio 0.5 | 0.700 ± {std:.3f} | 0.900 ± 0.000 |" in text
    assert "| random init | 0.500 ± 0.000 | 0.700 ± 0.000 |" in text
    assert "10% labels" in text and "100% labels" in text
    assert "pretrained0.5-frac1.0-seed1: ValueError: boom" in text
    frame = pd.read_csv(tmp_path / "results.csv")
    assert len(frame) == 6 and list(frame.columns[:7]) == ["trial", "label_fraction", "mask_ratio", "seed",
                                                           "encoder", "status", "error"]
    assert frame["balanced_accuracy"].isna().sum() == 1
    assert frame.loc[frame["status"] == "ok", "auroc"].tolist() == pytest.approx([0.6, 0.8, 0.9, 0.5, 0.7])
    for metric in METRICS:
        assert (tmp_path / f"{metric}_vs_label_fraction.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_refuses_missing_data_before_starting_ray(tmp_path):
    from sslmed.errors import DataError
    from sslmed.eval.sweep import sweep

    cfg = load_config("sweep-tiny", [f"data.path={tmp_path / 'nope'}", f"eval.data={tmp_path}",
                                     f"sweep.out={tmp_path / 'out'}"])
    with pytest.raises(DataError, match="data.path"):
        sweep(cfg)
    assert not (tmp_path / "out").exists()

"""`sslmed demo anomaly`: synthetic lesions sit where the labels say, and a shortened run of the whole
comparison (five methods on one ResNet, fine-tuned with the paper's protocol) reports what it computed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from sslmed.lesions import LESION_KINDS, insert_lesion, keeps_pack_scaling, scale_to_unit

INT16_STEP = 1.0 / 32767  # what packing as int16 may move a voxel by (half a step each way)


def tissue_crop(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return scale_to_unit(gaussian_filter(rng.standard_normal((size,) * 3), 2.0))


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_a_lesion_changes_its_crop_inside_its_mask_only(kind):
    sizes = []
    for seed in range(6):
        crop = tissue_crop(seed)
        anomalous, mask = insert_lesion(crop, kind, np.random.default_rng(100 + seed))
        diff = np.abs(anomalous - crop)
        assert np.all(diff[~mask] == 0)
        assert 20 < mask.sum() < mask.size / 4
        assert np.mean(diff[mask] > 0.01) > 0.5  # really there, not a faint trace
        assert anomalous.min() >= 0 and anomalous.max() <= 1
        again, same_mask = insert_lesion(crop, kind, np.random.default_rng(100 + seed))
        assert np.array_equal(again, anomalous) and np.array_equal(same_mask, mask)  # seeded
        sizes.append(int(mask.sum()))
    assert len(set(sizes)) == len(sizes)  # shape and size vary


def test_scaled_crops_are_left_as_they_are_by_packing(tmp_path):
    from sslmed.data.sources import open_dataset
    from sslmed.io.pack import pack

    crop = tissue_crop(1)
    assert keeps_pack_scaling(crop)
    np.save(tmp_path / "crop.npy", crop)
    pack([str(tmp_path / "crop.npy")], tmp_path / "packed", modality="mr", dtype="int16")
    dataset = open_dataset(tmp_path / "packed")
    assert np.abs(dataset.read(dataset.keys[0]) - crop).max() <= INT16_STEP


def test_demo_anomaly_refuses_the_main_demos_config(capsys):
    from sslmed.cli import main

    assert main(["demo", "anomaly", "--config", "brain-mri-cpu", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sslmed: error:") and "\n" not in err


def test_quick_anomaly_demo_reports_what_it_computed_on_lesions_where_the_labels_say(tmp_path, capsys):
    from sslmed.data.sources import open_dataset
    from sslmed.demo_anomaly import BASELINES, FRACTIONS, METHODS, POSITIVE, RANDOM_INIT, run_anomaly_demo
    from sslmed.train.checkpoint import load_encoder

    torch.set_num_threads(2)
    out = tmp_path / "anomaly"
    results = run_anomaly_demo(out, quick=True)
    printed = capsys.readouterr().out.strip().splitlines()

    # the last line, recomputed from each encoder's own metrics.json
    means = {}
    for name in (RANDOM_INIT, *METHODS):
        report = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert report["positive_label"] == POSITIVE and report["mode"] == "finetune"
        assert report["cv_folds"] == 2
        assert {r["label_fraction"] for r in report["runs"]} == set(FRACTIONS)
        means[name] = np.mean([r["metrics"]["auprc"] for r in report["runs"] if r["label_fraction"] == 0.1])
    best = max(means[m] for m in BASELINES)
    assert re.fullmatch(r"auprc10_residual=\d\.\d{3} auprc10_best_baseline=\d\.\d{3}", printed[-1])
    assert printed[-1] == f"auprc10_residual={means['residual']:.3f} auprc10_best_baseline={best:.3f}"
    table = (out / "results.md").read_text()
    assert "| label fraction | random-init | residual | simclr | byol | simsiam | spark |" in table
    assert re.search(r"^\| 0\.1 \|", table, re.M) and re.search(r"^\| 1 \|", table, re.M)
    assert (out / "results.png").stat().st_size > 0 and results["last_line"] == printed[-1]

    # every method exported the same backbone: class, widths, depth
    exports = {m: load_encoder(out / "runs" / m / "encoder.safetensors").export_config() for m in METHODS}
    assert all(e == exports["residual"] for e in exports.values())
    assert exports["residual"]["arch"] == "resnet3d" and exports["residual"]["kwargs"]["depth"] == 18

    # the lesions are where the labels say: an anomalous crop differs from its twin inside its mask only
    labelled = open_dataset(out / "labelled")
    tags = {key: labelled.meta(key)["tags"] for key in labelled.keys}
    anomalous = [k for k, t in tags.items() if t["label"] == POSITIVE]
    assert anomalous and len(anomalous) * 2 == len(tags)
    for key in anomalous:
        twin = key.replace(POSITIVE, "normal")
        assert tags[twin]["label"] == "normal" and tags[twin]["place"] == tags[key]["place"]
        mask = np.load(out / "crops" / "labelled" / f"{key}.mask.npy", allow_pickle=False)
        diff = np.abs(labelled.read(key) - labelled.read(twin))
        assert diff[~mask].max() <= 2 * INT16_STEP
        assert np.mean(diff[mask] > 0.01) > 0.5
    pool = open_dataset(out / "pool")
    assert all("label" not in pool.meta(k).get("tags", {}) for k in pool.keys)  # unlabelled
    cae = open_dataset(out / "cae")
    assert all(cae.meta(k)["tags"]["status"] == "normal" for k in cae.keys)

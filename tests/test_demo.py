"""End to end on real volumes (the MNI152 template from nilearn, the ITK example T1 registered to it):
pack → register → pretrain → export → probes on both tasks, then a resumed pretraining run continuing
from the demo's last checkpoint."""

from __future__ import annotations

import json

import numpy as np
import torch

from sslmed.config import load_config
from sslmed.data.sources import open_dataset
from sslmed.demo import (
    ENCODERS,
    FRACTIONS,
    JITTER_MM,
    ROI_CLASSES,
    SWEEP_CROPS_PER_ROI,
    TASKS,
    central_intensity,
    roi_crops,
    run_demo,
    seitzman_rois,
)
from sslmed.io.register import world_bounds
from sslmed.train.loop import pretrain


def test_seitzman_table_maps_every_roi_to_a_class():
    coords, classes = seitzman_rois()
    assert coords.shape == (300, 3)
    counts = np.bincount(classes, minlength=len(ROI_CLASSES))
    assert counts.tolist() == [239, 34, 27]  # cortex (L/R/mid), hippocampus+amygdala+BG+thalamus, cerebellum


def test_central_intensity_is_the_mean_of_the_central_27_voxels():
    crops = np.zeros((1, 8, 8, 8), np.float32)
    crops[0, 3:6, 3:6, 3:6] = 1.0
    crops[0, 4, 4, 4] = 28.0  # 26 ones and one 28: mean 2
    assert central_intensity(crops)[0, 0] == 2.0


def test_quick_demo_runs_end_to_end_and_resumes(tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "demo"
    results = run_demo(out, quick=True)

    for task in TASKS:
        result = results["tasks"][task]
        assert set(result["encoders"]) == set(ENCODERS)
        for entry in result["encoders"].values():
            assert {float(f) for f in entry["summary"]} == set(FRACTIONS)
            assert all(0.0 <= run["metrics"]["balanced_accuracy"] <= 1.0 for run in entry["runs"])
    same = results["tasks"]["same-template"]
    assert same["n_train_rois"] + same["n_test_rois"] == 300  # split by ROI: each on one side only
    cross = results["tasks"]["cross-subject"]
    assert cross["n_train"] == cross["n_test"] == 300 * 2  # all template crops train, all subject crops test
    assert "cross-subject" in results["table"] and "same template" in results["table"]
    for name in ("results.md", "results.json", "results.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "unlabeled" / "manifest.json").read_text())["samples"] == 3  # no subject in it
    check_subject_labels_come_from_mapped_roi_centres(out / "subject")
    labelled = (out / "rois" / "labels.csv").read_text().splitlines()  # the sweep-demo labelled set
    assert labelled[0] == "path,label,group,location_x,location_y,location_z"
    assert len(labelled) == 1 + 300 * SWEEP_CROPS_PER_ROI
    assert {line.split(",")[1] for line in labelled[1:]} == set(ROI_CLASSES)
    run = out / "pretrain"
    assert (run / "encoder.safetensors").is_file() and list((run / "tb").iterdir())

    cfg = load_config("demo", [f"run.dir={run}", f"data.path={out / 'unlabeled'}", "train.steps=8",
                               "train.micro_batch=4", "checkpoint.every=3", "checkpoint.resume=auto"])
    pretrain(cfg)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [7, 8] and steps.count(7) == 1  # continued after the quick run's 6 steps


def check_subject_labels_come_from_mapped_roi_centres(subject):
    """Each crop of the second subject, mapped back through its registration, sits at (jittered, rounded)
    the ROI whose class it carries."""
    dataset = open_dataset(subject)
    key = dataset.keys[0]
    meta = dataset.meta(key)
    rois = roi_crops(dataset, key, 16, 1, JITTER_MM, seed=3)
    coords, classes = seitzman_rois()
    in_template = (np.asarray(meta["atlas_affine"]) @ np.c_[rois.centres, np.ones(len(rois.centres))].T)[:3].T
    distance = np.linalg.norm(in_template - coords[rois.groups], axis=1)
    voxel_mm = np.linalg.norm(np.asarray(meta["atlas_affine"])[:3, :3], axis=0).max()
    assert distance.max() <= np.sqrt(3) * (JITTER_MM + voxel_mm)
    assert np.array_equal(rois.labels, classes[rois.groups])
    assert np.array_equal(rois.groups, np.arange(300))
    check_locations_are_scaled_roi_positions(rois, np.asarray(meta["atlas_bounds"]), voxel_mm)
    # the template's own crops (packed without an atlas: it is the atlas) are located the same way
    templates = open_dataset(subject.parent / "unlabeled")
    t1 = next(k for k in templates.keys if "_t1_" in k)
    bounds = world_bounds(templates.meta(t1)["shape"], np.asarray(templates.meta(t1)["affine"]))
    check_locations_are_scaled_roi_positions(roi_crops(templates, t1, 16, 1, JITTER_MM, seed=3), bounds, 1.0)


def check_locations_are_scaled_roi_positions(rois, bounds: np.ndarray, voxel_mm: float) -> None:
    """Each crop's location is its ROI's template position scaled to [-1, 1] by the template's extent."""
    coords, _ = seitzman_rois()
    low, high = bounds
    scaled = 2 * (coords[rois.groups] - low) / (high - low) - 1
    tolerance = 2 * np.sqrt(3) * (JITTER_MM + voxel_mm) / (high - low).min()
    assert np.abs(rois.locations - scaled).max() <= tolerance

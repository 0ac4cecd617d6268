"""Downstream probes on a tiny labelled set whose label is learnable (stripe orientation)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sslmed.config import load_config
from sslmed.errors import CheckpointError, ConfigError, DataError
from sslmed.eval.probe import finetune

torch.set_num_threads(1)

N_SAMPLES = 32
TINY_VIT = ["model.arch=vit3d", "model.dim=32", "model.depth=2", "model.heads=2", "model.patch_size=8",
            "data.crop_size=16"]


def stripes(rng: np.random.Generator, label: int) -> np.ndarray:
    """Noise plus stripes along axis 0 (label 1) or axis 1 (label 0): orientation, not intensity."""
    volume = rng.normal(0.0, 0.5, (20, 20, 20)).astype(np.float32)
    if label:
        volume[::4] += 1.5
    else:
        volume[:, ::4] += 1.5
    return volume


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    """v*.npy samples and w*.npy co-registered siblings (the same volume mirrored) + labels.csv."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_SAMPLES):
        label = i % 2
        volume = stripes(rng, label)
        np.save(root / f"v{i:02d}.npy", volume)
        np.save(root / f"w{i:02d}.npy", np.ascontiguousarray(volume[::-1]))
        rows.append({"path": f"v{i:02d}.npy", "label": ["horizontal", "vertical"][label],
                     "group": str(i // 4), "other": f"w{i:02d}.npy"})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def probe_config(tmp_path: Path, data: Path, *extra: str):
    return load_config("finetune-tiny", [*TINY_VIT, f"eval.data={data}", f"run.dir={tmp_path / 'run'}",
                                         "eval.label_fractions=[0.5,1.0]", "eval.seeds=[0,1]",
                                         "eval.epochs=10", "eval.batch_size=8", *extra])


def check_report(report: dict, run_dir: Path, chance: float = 0.5) -> None:
    on_disk = json.loads((run_dir / "metrics.json").read_text())  # strict JSON: no NaN tokens
    assert on_disk["runs"] == json.loads(json.dumps(report["runs"]))
    assert len(report["runs"]) == 4
    pairs = {(r["label_fraction"], r["seed"]) for r in report["runs"]}
    assert pairs == {(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)}
    for run in report["runs"]:
        assert run["metrics"]["balanced_accuracy"] >= chance + 0.25, run
    assert set(report["summary"]) == {"0.5", "1.0"}
    assert {"nmi", "ari", "cluster_accuracy"} <= set(report["clustering"])


@pytest.mark.parametrize("mode", ["linear", "knn", "finetune", "fusion"])
def test_probe_modes_learn_the_label(tmp_path, labelled_folder, mode):
    report = finetune(probe_config(tmp_path, labelled_folder, f"eval.mode={mode}",
                                   "eval.branches=[self,other]"))
    check_report(report, tmp_path / "run")
    assert report["n_train"] + report["n_test"] == N_SAMPLES


def test_subset_sizes_and_monai_encoder(tmp_path, labelled_folder):
    report = finetune(probe_config(tmp_path, labelled_folder, "eval.encoder=monai:resnet10", "eval.mode=knn",
                                   "eval.knn_k=3"))
    check_report(report, tmp_path / "run")
    n_train = report["n_train"]
    sizes = {r["label_fraction"]: r["n_labelled"] for r in report["runs"]}
    assert sizes[1.0] == n_train and sizes[0.5] == 2 * math.ceil(n_train / 4)  # balanced classes


def test_packed_dataset_exported_encoder_and_fusion_tags(tmp_path, labelled_folder):
    """The real pipeline: `pack` with a tags CSV, `open_dataset`, an exported encoder, sibling keys."""
    from sslmed.io.pack import pack
    from sslmed.models import build_backbone
    from sslmed.train.checkpoint import export_encoder

    tags = tmp_path / "tags.csv"
    with open(labelled_folder / "labels.csv", newline="") as src, open(tags, "w", newline="") as dst:
        writer = csv.DictWriter(dst, fieldnames=["path", "label", "subject", "other"])
        writer.writeheader()
        for row in csv.DictReader(src):  # siblings get no label tag: they are inputs, not samples
            writer.writerow({"path": row["path"], "label": row["label"], "subject": row["group"],
                             "other": Path(row["other"]).stem})
    summary = pack([labelled_folder], tmp_path / "packed", tags=tags)
    assert summary["ok"] == 2 * N_SAMPLES

    cfg = probe_config(tmp_path, tmp_path / "packed", "eval.group_key=subject")
    encoder_path = export_encoder(build_backbone(cfg), tmp_path / "enc.safetensors", {"crop_size": 16})
    cfg.eval.encoder = str(encoder_path)
    check_report(finetune(cfg), tmp_path / "run")

    fusion = probe_config(tmp_path, tmp_path / "packed", "eval.mode=fusion", "eval.branches=[self,other]",
                          f"eval.encoder={encoder_path}", "eval.label_fractions=[1.0]", "eval.seeds=[0]")
    report = finetune(fusion)
    assert report["n_train"] + report["n_test"] == N_SAMPLES  # siblings are not samples
    assert report["runs"][0]["metrics"]["balanced_accuracy"] >= 0.75


def test_bad_inputs_raise_clear_errors(tmp_path, labelled_folder):
    with pytest.raises(DataError, match="eval.data"):
        finetune(probe_config(tmp_path, tmp_path / "missing"))
    with pytest.raises(ConfigError, match="eval.branches"):
        finetune(probe_config(tmp_path, labelled_folder, "eval.mode=fusion"))
    with pytest.raises(DataError, match="missing column"):
        finetune(probe_config(tmp_path, labelled_folder, "data.label_key=diagnosis"))
    with pytest.raises(CheckpointError, match="not a file"):
        finetune(probe_config(tmp_path, labelled_folder, f"eval.encoder={tmp_path / 'none.safetensors'}"))
    with pytest.raises(ConfigError, match="no network"):
        finetune(probe_config(tmp_path, labelled_folder, "eval.encoder=monai:NoSuchNet"))

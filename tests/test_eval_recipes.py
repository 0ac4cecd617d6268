"""Evaluation protocols of the paper recipes: the named positive class, fine-tuning with k-fold CV,
class weights and checkpoint selection, and cluster evaluation (elbow, majority vote)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, davies_bouldin_score, silhouette_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from sslmed.cli import main
from sslmed.config import load_config
from sslmed.errors import ConfigError, DataError
from sslmed.eval import probe
from sslmed.eval.clustering import cluster_evaluation, elbow, majority_vote_mapping
from sslmed.eval.labelled import LabelledSet
from sslmed.eval.metrics import classification_metrics
from sslmed.eval.subsets import cross_validation_folds

torch.set_num_threads(1)

TINY_VIT = ["model.arch=vit3d", "model.dim=32", "model.depth=2", "model.heads=2", "model.patch_size=8",
            "data.crop_size=16"]


@pytest.fixture(scope="module")
def anomaly_folder(tmp_path_factory) -> Path:
    """24 volumes, 'anomalous' (a bright blob, 1 in 3) or 'normal'; `anomalous` sorts first."""
    root = tmp_path_factory.mktemp("anomaly")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        volume = rng.normal(0.0, 0.5, (16, 16, 16)).astype(np.float32)
        anomalous = i % 3 == 0
        if anomalous:
            centre = rng.integers(4, 12, 3)
            volume[tuple(slice(c - 2, c + 2) for c in centre)] += 2.0
        np.save(root / f"v{i:02d}.npy", volume)
        rows.append({"path": f"v{i:02d}.npy", "label": "anomalous" if anomalous else "normal"})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def config(tmp_path: Path, data: Path, *extra: str):
    return load_config("finetune-tiny", [*TINY_VIT, f"eval.data={data}", f"run.dir={tmp_path / 'run'}",
                                         "eval.label_fractions=[1.0]", "eval.seeds=[0]", "eval.epochs=4",
                                         "eval.batch_size=8", *extra])


def test_binary_auprc_is_that_of_the_named_class():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0])
    p0 = np.array([0.9, 0.4, 0.3, 0.6, 0.8, 0.2, 0.45, 0.1, 0.7])
    probs = np.stack([p0, 1 - p0], 1)
    named = classification_metrics(y, probs, ["anomalous", "normal"], positive=0)
    assert named["auprc"] == pytest.approx(average_precision_score(y == 0, p0))
    default = classification_metrics(y, probs, ["anomalous", "normal"])
    assert default["auprc"] == pytest.approx(average_precision_score(y == 1, 1 - p0))
    assert named["auprc"] != pytest.approx(default["auprc"])


def test_positive_label_reaches_the_report_and_a_wrong_one_is_refused(tmp_path, anomaly_folder, capsys):
    report = probe.finetune(config(tmp_path, anomaly_folder, "eval.positive_label=anomalous"))
    assert report["classes"] == ["anomalous", "normal"] and report["positive_label"] == "anomalous"
    metrics = report["runs"][0]["metrics"]
    assert metrics["auprc"] == metrics["per_class"]["anomalous"]["auprc"]
    assert metrics["auprc"] != metrics["per_class"]["normal"]["auprc"]
    code = main(["finetune", "finetune-tiny", *TINY_VIT, f"eval.data={anomaly_folder}",
                 f"run.dir={tmp_path / 'bad'}", "eval.positive_label=sick"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sslmed: error: eval.positive_label: 'sick'")


def test_cross_validation_folds_partition_the_training_split():
    labels = np.array([0] * 12 + [1] * 6)
    folds = cross_validation_folds(labels, 3)
    assert len(folds) == 3
    validation = np.concatenate([val for _, val in folds])
    assert sorted(validation.tolist()) == list(range(18))  # every position validates exactly once
    for train, val in folds:
        assert not set(train) & set(val)
        assert np.bincount(labels[val]).tolist() == [4, 2]  # stratified
    groups = np.repeat(np.arange(9), 2)
    for train, val in cross_validation_folds(labels, 3, groups):
        assert not set(groups[train]) & set(groups[val])
    with pytest.raises(DataError, match="cv_folds=7"):
        cross_validation_folds(labels, 7)
    with pytest.raises(ConfigError, match="cv_folds"):
        load_config("finetune-tiny", ["eval.cv_folds=1"])


def test_class_weights_are_balanced():
    labels = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(probe.class_weights(labels, 3).numpy(), expected, rtol=1e-6)


def test_validation_keeps_the_epoch_with_the_lowest_validation_loss(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, 1, 2, 2, 2)).astype(np.float32)
    labels = (images[:, 0, 0, 0, 0] > 0).astype(np.int64)
    val_images = rng.normal(size=(12, 1, 2, 2, 2)).astype(np.float32)
    val_labels = rng.integers(0, 2, 12)  # unrelated to the inputs: the validation loss goes up and down
    seen = []
    real = probe.validation_loss

    def recording(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(probe, "validation_loss", recording)
    cfg = load_config("finetune-tiny", ["eval.epochs=12", "eval.lr=0.5", "eval.batch_size=8",
                                        "eval.optimizer=adam", "eval.class_weighted=true"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    probe.train_classifier(model, images, labels, cfg, 0, 2, (val_images, val_labels))
    assert len(seen) == 12 and np.argmin(seen) != 11  # the last epoch is not the best one
    weight = probe.class_weights(labels, 2)
    kept = real(model, val_images, val_labels, nn.CrossEntropyLoss(weight=weight), 8)
    assert kept == pytest.approx(min(seen))


def test_finetune_with_cv_folds_mlp_head_and_adam(tmp_path, anomaly_folder):
    report = probe.finetune(config(tmp_path, anomaly_folder, "eval.mode=finetune", "eval.head=mlp",
                                   "eval.class_weighted=true", "eval.optimizer=adam", "eval.lr=0.001",
                                   "eval.cv_folds=3", "eval.positive_label=anomalous"))
    assert [r["fold"] for r in report["runs"]] == [0, 1, 2]
    # Each fold trains on the other two folds' share of the training split.
    assert sum(r["n_labelled"] for r in report["runs"]) == 2 * report["n_train"]
    assert report["summary"]["1.0"]["auprc"]["n"] == 3


def blobs(centres: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = np.concatenate([c + 0.05 * rng.normal(size=(per_class, centres.shape[1])) for c in centres])
    return features, np.repeat(np.arange(len(centres)), per_class)


def test_majority_vote_mapping_by_hand():
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 4, 4])
    labels = np.array([1, 1, 0, 0, 0, 1, 1, 0, 1])
    # 0: two 1s beat one 0; 1: all 0; 2: all 1; 3: empty, takes the overall majority (five 1s vs four 0s);
    # 4: a tie, the smaller label.
    assert majority_vote_mapping(clusters, labels, 5).tolist() == [1, 0, 1, 1, 0]


def test_elbow_by_hand():
    # Scaled to [0, 1]: x = 0, .25, .5, .75, 1 and y = 1, .231, .103, .038, 0; the distance below the
    # chord y = 1 − x is 0, .519, .397, .212, 0: the elbow is at k = 3.
    assert elbow([2, 3, 4, 5, 6], [100.0, 40.0, 30.0, 25.0, 22.0]) == 3
    assert elbow([2, 3], [10.0, 5.0]) == 2


def test_cluster_evaluation_on_separated_blobs():
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    features, labels = blobs(centres, 10, seed=1)
    data = LabelledSet(images=np.zeros((30, 1, 1, 1, 1), np.float32), labels=labels, classes=["a", "b", "c"],
                       groups=None, keys=[str(i) for i in range(30)])
    test_idx = np.arange(0, 30, 3)
    train_idx = np.setdiff1d(np.arange(30), test_idx)
    cfg = load_config("finetune-tiny", ["eval.mode=cluster", "eval.label_fractions=[0.2,1.0]",
                                        "eval.seeds=[0]", "eval.knn_k=5"])
    runs, clustering = cluster_evaluation(cfg, data, features, train_idx, test_idx, positive=None)
    assert clustering["k_from"] == "elbow" and clustering["n_clusters"] == 3
    assert clustering["nmi"] == pytest.approx(1.0) and clustering["ari"] == pytest.approx(1.0)
    test_clusters = labels[test_idx]  # perfect clusters coincide with the classes up to naming
    test_x = features[test_idx]
    assert clustering["silhouette"] == pytest.approx(silhouette_score(test_x, test_clusters))
    assert clustering["davies_bouldin"] == pytest.approx(davies_bouldin_score(test_x, test_clusters))
    assert [r["metrics"]["accuracy"] for r in runs] == [1.0, 1.0]  # two labels per cluster suffice
    assert runs[1]["metrics"]["knn_accuracy"] == 1.0  # 5 neighbours need more than 2 labels per class
    assert [r["n_labelled"] for r in runs] == [6, 20]  # 2 of 6 or 7 per class; all 20
    cfg.eval.clusters = 5
    _, given = cluster_evaluation(cfg, data, features, train_idx, test_idx, positive=None)
    assert given["n_clusters"] == 5 and given["k_from"] == "eval.clusters"
    cfg.eval.cv_folds = 3
    with pytest.raises(ConfigError, match="cv_folds"):
        cluster_evaluation(cfg, data, features, train_idx, test_idx, positive=None)


def test_cluster_mode_end_to_end(tmp_path, anomaly_folder):
    report = probe.finetune(config(tmp_path, anomaly_folder, "eval.mode=cluster", "eval.clusters=2",
                                   "eval.knn_k=5"))
    assert report["clustering"]["n_clusters"] == 2
    assert {"knn_accuracy", "auprc"} <= set(report["summary"]["1.0"])


def test_sweep_trial_reports_the_mean_over_cross_validation_folds(monkeypatch):
    from sslmed.eval import sweep

    def fake_finetune(cfg):
        runs = [{"label_fraction": 0.5, "seed": 0, "n_labelled": 6, "fold": i,
                 "metrics": {**{m: 0.1 * (i + 1) for m in sweep.RESULT_METRICS}, "auprc": [0.5, 0.7, 0.9][i]}}
                for i in range(3)]
        return {"runs": runs, "clustering": {m: 0.0 for m in sweep.CLUSTER_METRICS}}

    reported = []
    monkeypatch.setattr(probe, "finetune", fake_finetune)
    monkeypatch.setattr(sweep.tune, "report", reported.append)
    base = load_config("finetune-tiny", ["eval.cv_folds=3"]).to_dict()
    trial = {"encoder": "random", "mask_ratio": None, "label_fraction": 0.5, "seed": 0}
    sweep.evaluation_trial({"trial": trial}, base, {}, "/tmp/unused")
    assert reported[0]["auprc"] == pytest.approx(0.7) and reported[0]["accuracy"] == pytest.approx(0.2)

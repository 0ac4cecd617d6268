"""Classification/clustering metrics against scikit-learn and brute force; label-fraction subsets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import (
    adjusted_rand_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    normalized_mutual_info_score,
    roc_auc_score,
)

from sslmed.errors import ConfigError, DataError
from sslmed.eval.metrics import classification_metrics, cluster_accuracy, clustering_metrics
from sslmed.eval.subsets import label_subset, split_train_test


def _probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    raw = rng.random((n, k))
    return raw / raw.sum(axis=1, keepdims=True)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    probs = _probs(rng, 60, 3)
    probs[np.arange(60), y] += 0.3 * rng.random(60)  # informative but imperfect
    probs /= probs.sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    per_auc = [roc_auc_score(y == c, probs[:, c]) for c in range(3)]
    per_ap = [average_precision_score(y == c, probs[:, c]) for c in range(3)]
    assert m["auroc"] == pytest.approx(np.mean(per_auc))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["auprc"] == pytest.approx(np.mean(per_ap))
    assert [m["per_class"][c]["auroc"] for c in "abc"] == pytest.approx(per_auc)
    assert [m["per_class"][c]["support"] for c in "abc"] == [int((y == c).sum()) for c in range(3)]


def test_binary_metrics_use_positive_class():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.3, 0.9, 0.2, 0.7])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["auprc"] == pytest.approx(average_precision_score(y, p1))
    # Independent check of AUROC: fraction of (positive, negative) pairs ranked correctly.
    pos, neg = p1[y == 1], p1[y == 0]
    assert m["auroc"] == pytest.approx(np.mean([p > n for p in pos for n in neg]))


def test_class_absent_from_split_is_nan_and_skipped_in_macro():
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 0, 1, 0, 1, 1, 0])  # class 2 absent from this split
    probs = _probs(rng, 8, 3)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert math.isnan(m["per_class"]["c"]["auroc"]) and math.isnan(m["per_class"]["c"]["auprc"])
    assert m["per_class"]["c"]["support"] == 0
    expected = np.mean([roc_auc_score(y == c, probs[:, c]) for c in (0, 1)])
    assert m["auroc"] == pytest.approx(expected)


def test_cluster_accuracy_matches_brute_force():
    rng = np.random.default_rng(2)
    for n_clusters in (3, 4):  # as many clusters as classes, and one surplus cluster
        y = rng.integers(0, 3, 30)
        clusters = rng.integers(0, n_clusters, 30)
        best = max(np.mean([mapping[c] == t for c, t in zip(clusters, y, strict=True)])
                   for perm in itertools.permutations(range(max(3, n_clusters)))
                   for mapping in [dict(zip(range(n_clusters), perm, strict=False))])
        assert cluster_accuracy(y, clusters) == pytest.approx(best)
    assert cluster_accuracy([0, 0, 1, 1], [5, 5, 2, 2]) == 1.0


def test_clustering_metrics_on_separable_embeddings():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 10)
    emb = np.eye(3)[y] * 10 + rng.normal(0, 0.1, (30, 3))
    m = clustering_metrics(emb, y, 3, seed=0)
    assert m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0) and m["cluster_accuracy"] == 1.0
    noisy = rng.normal(0, 1, (30, 3))
    m = clustering_metrics(noisy, y, 3, seed=0)
    from sklearn.cluster import KMeans

    clusters = KMeans(3, n_init=10, random_state=0).fit_predict(noisy)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, clusters))
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, clusters))


# ---- subsets -----------------------------------------------------------------------------------


def test_label_subsets_stratified_nested_and_reproducible():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 7)
    subsets = {f: label_subset(labels, f, seed=4) for f in (0.01, 0.1, 0.5, 1.0)}
    for f, idx in subsets.items():
        counts = np.bincount(labels[idx], minlength=3)
        assert counts.tolist() == [max(1, math.ceil(f * n - 1e-9)) for n in (50, 30, 7)]
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[0.5]) <= set(subsets[1.0])
    assert len(subsets[1.0]) == len(labels)
    assert np.array_equal(label_subset(labels, 0.1, seed=4), subsets[0.1])
    assert not np.array_equal(label_subset(labels, 0.5, seed=5), subsets[0.5])
    assert len(label_subset(np.repeat([0, 1], 10), 0.7, seed=0)) == 14  # 0.7 · 10 is 7, not 8
    with pytest.raises(ConfigError, match="label fraction"):
        label_subset(labels, 0.0, seed=0)


def test_test_split_is_fixed_stratified_and_grouped():
    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1], 40)
    train, test = split_train_test(labels, 0.25)
    assert np.array_equal(test, split_train_test(labels, 0.25)[1])  # same data → same test set
    assert np.bincount(labels[test]).tolist() == [10, 10]
    assert set(train).isdisjoint(test) and len(train) + len(test) == 80
    groups = rng.integers(0, 16, 80)
    labels = np.array([g % 2 for g in groups])  # label constant within a group, like crops of one ROI
    train, test = split_train_test(labels, 0.25, groups=groups)
    assert set(groups[train]).isdisjoint(groups[test])
    assert len(train) + len(test) == 80 and set(labels[test]) == {0, 1}
    with pytest.raises(DataError, match="groups"):
        split_train_test(labels, 0.25, groups=np.zeros(80, dtype=int))

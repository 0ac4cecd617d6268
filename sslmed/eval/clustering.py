"""Cluster evaluation of frozen embeddings (`eval.mode=cluster`), as contrastive-autoencoder papers do it.

1. k-means (scikit-learn) on the training split's embeddings, with `eval.clusters` clusters or, when it
   is 0, k chosen by the elbow of the inertia curve over k = 2…20;
2. each cluster is named by a majority vote of the labelled training samples in it (the label-fraction
   subset of each seed), and the test samples take the name of their nearest centre;
3. scored on the test split: classification metrics of those names, a kNN vote (`eval.knn_k`,
   Euclidean) from the same labelled subset, and NMI / ARI / Hungarian accuracy / silhouette /
   Davies–Bouldin of the test clusters.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

from sslmed.config import Config
from sslmed.errors import ConfigError
from sslmed.eval.labelled import LabelledSet
from sslmed.eval.metrics import classification_metrics, cluster_scores
from sslmed.eval.subsets import label_subset

ELBOW_RANGE = (2, 20)


def kmeans(features: np.ndarray, k: int, seed: int) -> KMeans:
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)


def elbow(ks: list[int], inertias: list[float]) -> int:
    """The k whose point lies farthest below the chord from the first to the last point of the inertia
    curve, both axes scaled to [0, 1] (the "kneedle" reading of an elbow)."""
    if len(ks) < 3:
        return ks[0]
    x = (np.asarray(ks, float) - ks[0]) / (ks[-1] - ks[0])
    y = np.asarray(inertias, float)
    span = y[0] - y[-1]
    y = (y - y[-1]) / span if span > 0 else np.zeros_like(y)
    below_chord = (1.0 - x) - y  # the chord runs from (0, 1) to (1, 0)
    return int(ks[int(np.argmax(below_chord))])


def elbow_k(features: np.ndarray, seed: int, k_range: tuple[int, int] = ELBOW_RANGE) -> tuple[int, dict]:
    """(k by the elbow, {k: inertia}) over k_range, capped below the number of samples."""
    ks = list(range(k_range[0], min(k_range[1], len(features) - 1) + 1)) or [1]
    inertias = [float(kmeans(features, k, seed).inertia_) for k in ks]
    return elbow(ks, inertias), dict(zip(ks, inertias, strict=True))


def majority_vote_mapping(clusters: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """(n_clusters,) label of each cluster: the most frequent label among its labelled members (ties: the
    smaller label); a cluster without labelled members takes the most frequent label overall."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    fallback = np.bincount(labels).argmax()
    mapping = np.full(n_clusters, fallback, dtype=np.int64)
    for c in range(n_clusters):
        members = labels[clusters == c]
        if len(members):
            mapping[c] = np.bincount(members).argmax()
    return mapping


def cluster_evaluation(cfg: Config, data: LabelledSet, features: np.ndarray, train_idx: np.ndarray,
                       test_idx: np.ndarray, positive: int | None) -> tuple[list[dict], dict]:
    """(one run per label fraction × seed, the clustering summary) — see the module docstring."""
    if cfg.eval.cv_folds:
        raise ConfigError("eval.cv_folds does not apply to eval.mode=cluster (k-means is fitted once on "
                          "the whole training split); set eval.cv_folds=0")
    train_x, test_x = features[train_idx], features[test_idx]
    train_y, test_y = data.labels[train_idx], data.labels[test_idx]
    if cfg.eval.clusters > 0:
        k, inertias = min(cfg.eval.clusters, len(train_x)), {}
    else:
        k, inertias = elbow_k(train_x, cfg.train.seed)
    model = kmeans(train_x, k, cfg.train.seed)
    train_clusters, test_clusters = model.labels_, model.predict(test_x)
    n_classes = len(data.classes)
    runs = []
    for fraction in cfg.eval.label_fractions:
        for seed in cfg.eval.seeds:
            chosen = label_subset(train_y, fraction, seed)
            names = majority_vote_mapping(train_clusters[chosen], train_y[chosen], k)[test_clusters]
            metrics = classification_metrics(test_y, np.eye(n_classes)[names], data.classes, positive)
            knn = KNeighborsClassifier(n_neighbors=min(cfg.eval.knn_k, len(chosen)))
            predicted = knn.fit(train_x[chosen], train_y[chosen]).predict(test_x)
            metrics["knn_accuracy"] = float(accuracy_score(test_y, predicted))
            metrics["knn_balanced_accuracy"] = float(balanced_accuracy_score(test_y, predicted))
            runs.append({"label_fraction": fraction, "seed": seed, "n_labelled": int(len(chosen)),
                         "metrics": metrics})
    clustering = {"n_clusters": int(k), "k_from": "eval.clusters" if cfg.eval.clusters > 0 else "elbow",
                  "inertia": {str(key): value for key, value in inertias.items()},
                  **cluster_scores(test_x, test_y, test_clusters)}
    return runs, clustering

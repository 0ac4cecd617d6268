"""Classification metrics for probes and clustering metrics for embeddings (scikit-learn).

Conventions:

* labels are class indices `0..K-1`; `probs` is `(N, K)` with one column per class of the whole task,
  so a class that a split lacks still has its column;
* a class with no positive (or no negative) sample in `y_true` has no ROC or PR curve: its per-class
  AUROC/AUPRC is NaN and the macro averages skip it (NaN only when no class is scoreable);
* `auroc`/`auprc` are those of the positive class when one is named (`positive`, an index; e.g. the
  anomalous class), else of class 1 in binary tasks and the one-vs-rest macro mean in multi-class ones.
  Per-class values are always reported.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    average_precision_score,
    balanced_accuracy_score,
    davies_bouldin_score,
    f1_score,
    normalized_mutual_info_score,
    roc_auc_score,
    silhouette_score,
)
from sklearn.metrics.cluster import contingency_matrix


def per_class_curves(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest AUROC and AUPRC per class; NaN for a class absent from (or filling) `y_true`."""
    n_classes = probs.shape[1]
    auroc = np.full(n_classes, np.nan)
    auprc = np.full(n_classes, np.nan)
    for c in range(n_classes):
        positive = y_true == c
        if positive.any() and not positive.all():
            auroc[c] = roc_auc_score(positive, probs[:, c])
            auprc[c] = average_precision_score(positive, probs[:, c])
    return auroc, auprc


def _nanmean(values: np.ndarray) -> float:
    return float(np.mean(values[~np.isnan(values)])) if (~np.isnan(values)).any() else float("nan")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           class_names: list[str] | None = None, positive: int | None = None) -> dict:
    """Accuracy, balanced accuracy, macro-F1, AUROC and AUPRC (summary and per class) of `probs`."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must be (N, K) with N = {len(y_true)}, got {probs.shape}")
    n_classes = probs.shape[1]
    names = class_names or [str(c) for c in range(n_classes)]
    y_pred = probs.argmax(axis=1)
    auroc, auprc = per_class_curves(y_true, probs)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on small splits
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y_true, y_pred)
        macro_f1 = f1_score(y_true, y_pred, average="macro", zero_division=0)
    if positive is None and n_classes == 2:
        positive = 1
    if positive is not None:
        auroc_summary, auprc_summary = float(auroc[positive]), float(auprc[positive])
    else:
        auroc_summary, auprc_summary = _nanmean(auroc), _nanmean(auprc)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(macro_f1),
        "auroc": auroc_summary,
        "auprc": auprc_summary,
        "per_class": {name: {"auroc": float(a), "auprc": float(p), "support": int((y_true == c).sum())}
                      for c, (name, a, p) in enumerate(zip(names, auroc, auprc, strict=True))},
    }


def cluster_accuracy(y_true: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian algorithm)."""
    # Rows are clusters, columns classes; a rectangular matrix leaves surplus clusters or classes unmatched.
    counts = contingency_matrix(y_true, clusters).T
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(y_true))


def cluster_scores(embeddings: np.ndarray, y_true: np.ndarray, clusters: np.ndarray) -> dict:
    """Agreement of `clusters` with the labels (NMI, ARI, Hungarian accuracy) and their geometry in
    `embeddings` (silhouette, higher is better; Davies–Bouldin, lower is better; NaN when undefined)."""
    n_found = len(np.unique(clusters))
    geometric = 1 < n_found < len(embeddings)  # both scores need 2 ≤ clusters < samples
    return {
        "nmi": float(normalized_mutual_info_score(y_true, clusters)),
        "ari": float(adjusted_rand_score(y_true, clusters)),
        "cluster_accuracy": cluster_accuracy(y_true, clusters),
        "silhouette": float(silhouette_score(embeddings, clusters)) if geometric else float("nan"),
        "davies_bouldin": float(davies_bouldin_score(embeddings, clusters)) if geometric else float("nan"),
    }


def clustering_metrics(embeddings: np.ndarray, y_true: np.ndarray, n_clusters: int, seed: int = 0) -> dict:
    """k-means on `embeddings`, compared with the labels (`cluster_scores`)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    n_clusters = max(1, min(n_clusters, len(embeddings)))
    clusters = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(embeddings)
    return {"n_clusters": n_clusters, **cluster_scores(embeddings, y_true, clusters)}

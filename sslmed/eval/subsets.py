"""Which samples a downstream run may see: one fixed test split, and nested label-fraction subsets.

* The test split depends only on the data and `TEST_SPLIT_SEED`, never on the evaluation seed, so every
  label fraction, seed and encoder is scored on the same test samples. With a group key (subject, ROI)
  no group is on both sides.
* A label-fraction subset draws one permutation per class from the seed; fraction f keeps the first
  ceil(f · n_c) samples of class c (at least one). Hence 1% ⊂ 10% ⊂ 100% for one seed, and the same
  seed gives the same subsets in every run.
* With `eval.cv_folds = k`, the training split is cut into k stratified folds (grouped with a group
  key), also by `TEST_SPLIT_SEED`: fold i trains on the other folds (its label-fraction subset) and keeps
  fold i for validation; every fold is scored on the same test split.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from sslmed.errors import ConfigError, DataError

TEST_SPLIT_SEED = 0


def split_train_test(labels: np.ndarray, test_fraction: float, groups: np.ndarray | None = None,
               seed: int = TEST_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), stratified by label; grouped when `groups` is given."""
    labels = np.asarray(labels)
    if not 0 < test_fraction < 1:
        raise ConfigError(f"eval.test_fraction must be in (0, 1), got {test_fraction}")
    indices = np.arange(len(labels))
    if groups is None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() < 2 or round(test_fraction * len(labels)) < len(counts):
            raise DataError(f"too few labelled samples for a stratified test split: class sizes "
                            f"{counts.tolist()} with eval.test_fraction={test_fraction}")
        train, test = train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)
        return np.sort(train), np.sort(test)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    n_splits = max(2, round(1 / test_fraction))
    if n_groups < n_splits:
        raise DataError(f"{n_groups} groups cannot form a grouped test split of "
                        f"eval.test_fraction={test_fraction} (needs at least {n_splits} groups)")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, test = next(folds.split(indices, labels, groups))
    return np.sort(train), np.sort(test)


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified, seeded, nested subset holding `fraction` of each class."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"a label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):  # sorted, so the draws happen in the same order in every run
        members = rng.permutation(np.flatnonzero(labels == cls))
        # The epsilon keeps 0.7 · 10 (7.000000000000001 in floating point) at 7.
        chosen.append(members[:max(1, math.ceil(fraction * len(members) - 1e-9))])
    return np.sort(np.concatenate(chosen))


def cross_validation_folds(labels: np.ndarray, n_folds: int, groups: np.ndarray | None = None,
                           seed: int = TEST_SPLIT_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(training positions, validation positions)] × `n_folds`, positions into `labels`; stratified."""
    labels = np.asarray(labels)
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    units = len(np.unique(groups)) if groups is not None else smallest
    if units < n_folds:
        what = "groups" if groups is not None else "samples in the smallest class"
        raise DataError(f"eval.cv_folds={n_folds}: the training split has only {units} {what}")
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(labels, labels)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(labels, labels, np.asarray(groups))
    return [(np.sort(train), np.sort(val)) for train, val in splits]

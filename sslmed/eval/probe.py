"""Downstream evaluation of an encoder at several label fractions and seeds.

Modes (`eval.mode`):

* `linear` — logistic regression (scikit-learn) on standardised frozen features, classes weighted
  inversely to their frequency (scarce-label subsets of clinical data are rarely balanced);
* `knn` — cosine k-nearest-neighbour vote (`eval.knn_k`, weighted by 1/distance) on frozen features;
* `finetune` — the encoder and a classifier head (`eval.head`: linear, or an MLP features → 256 →
  classes) trained end to end (`eval.epochs`, `eval.lr`, `eval.optimizer`, `eval.batch_size`,
  `eval.class_weighted`);
* `fusion` — one encoder branch per input (`eval.branches`; `eval.fusion_shared` for one shared encoder),
  cross-branch attention (`eval.fusion_attention`), feature- and decision-level fusion
  (`sslmed.models.fusion`), trained end to end like `finetune`;
* `cluster` — k-means on frozen features, clusters named by majority vote (`clustering.py`).

Every (label fraction, seed) pair trains on its nested subset of one fixed training split and is scored
on one fixed test split (`subsets.py`); with `eval.cv_folds = k` every pair runs once per fold of a
stratified k-fold split of the training split, the fold's validation part choosing the epoch whose
weights are kept (trained modes). The frozen test embeddings are also clustered (k-means) and compared
with the labels. AUROC/AUPRC are those of `eval.positive_label` when it is set. Everything lands in
`RUN/metrics.json`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from sslmed.config import Config
from sslmed.errors import ConfigError, DataError
from sslmed.eval.clustering import cluster_evaluation
from sslmed.eval.encoders import (
    build_encoder,
    device_of,
    extract_features,
    feature_dim,
    needs_location,
    require_locations,
)
from sslmed.eval.labelled import LabelledSet, load_labelled
from sslmed.eval.metrics import classification_metrics, clustering_metrics
from sslmed.eval.reports import summarise, summary_table, write_json_atomic
from sslmed.eval.subsets import cross_validation_folds, label_subset, split_train_test
from sslmed.models.fusion import FusionClassifier
from sslmed.models.heads import classifier_head

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc")
CLUSTER_SUMMARY_METRICS = (*SUMMARY_METRICS, "knn_accuracy", "knn_balanced_accuracy")


def positive_index(cfg: Config, classes: list[str]) -> int | None:
    """Index of `eval.positive_label` in `classes`; None when unset (metrics then use their default)."""
    name = cfg.eval.positive_label
    if not name:
        return None
    if name not in classes:
        raise ConfigError(f"eval.positive_label: '{name}' is not a class of {cfg.eval.data} "
                          f"(classes: {', '.join(classes)})")
    return classes.index(name)


Pool = tuple[int | None, np.ndarray, np.ndarray | None]


def training_pools(cfg: Config, data: LabelledSet, train_idx: np.ndarray) -> list[Pool]:
    """[(fold, indices label subsets are drawn from, validation indices)]: the whole training split, or
    one entry per cross-validation fold."""
    if not cfg.eval.cv_folds:
        return [(None, train_idx, None)]
    groups = None if data.groups is None else data.groups[train_idx]
    folds = cross_validation_folds(data.labels[train_idx], cfg.eval.cv_folds, groups)
    return [(i, train_idx[train], train_idx[val]) for i, (train, val) in enumerate(folds)]


def finetune(cfg: Config) -> dict:
    """Evaluate `cfg.eval.encoder` on `cfg.eval.data` for every label fraction × seed; write metrics.json."""
    data = load_labelled(cfg)
    positive = positive_index(cfg, data.classes)
    train_idx, test_idx = split_train_test(data.labels, cfg.eval.test_fraction, data.groups)
    encoder = build_encoder(cfg, seed=cfg.train.seed).to(_device())
    features = frozen_features(cfg, encoder, data)
    if cfg.eval.mode == "cluster":
        runs, clustering = cluster_evaluation(cfg, data, features, train_idx, test_idx, positive)
        summary_metrics = CLUSTER_SUMMARY_METRICS
    else:
        runs = probe_runs(cfg, encoder, data, features, train_idx, test_idx, positive)
        clustering = clustering_metrics(features[test_idx], data.labels[test_idx],
                                        cfg.eval.clusters or len(data.classes), seed=cfg.train.seed)
        summary_metrics = SUMMARY_METRICS
    binary_default = positive is None and len(data.classes) == 2  # class 1, as `classification_metrics` does
    report = {
        "encoder": cfg.eval.encoder, "mode": cfg.eval.mode, "data": cfg.eval.data, "classes": data.classes,
        "positive_label": data.classes[1] if binary_default else (None if positive is None
                                                                 else data.classes[positive]),
        "n_train": int(len(train_idx)), "n_test": int(len(test_idx)), "cv_folds": cfg.eval.cv_folds,
        "runs": runs, "summary": summarise(runs, summary_metrics), "clustering": clustering,
    }
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "metrics.json", report)
    print(summary_table(report), f"\nwrote {run_dir / 'metrics.json'}", sep="\n")
    return report


def frozen_features(cfg: Config, encoder: nn.Module, data: LabelledSet) -> np.ndarray:
    """One feature vector per sample: its centre crop encoded at its location, or (`eval.pool`) its
    crops at every atlas grid point pooled into one vector per subject."""
    if cfg.eval.pool != "none":
        from sslmed.eval.pooling import pooled_features

        return pooled_features(cfg, encoder, data.keys)
    require_locations(encoder, data.locations, cfg.eval.data)
    if needs_location(encoder) and cfg.eval.mode == "fusion":
        raise ConfigError("eval.mode=fusion does not pass locations to its branch encoders yet; a "
                          "location-conditioned encoder can be probed with linear, knn, cluster or finetune")
    return extract_features(encoder, data.images, cfg.eval.batch_size, data.locations)


def probe_runs(cfg: Config, encoder: nn.Module | None, data: LabelledSet, features: np.ndarray,
               train_idx: np.ndarray, test_idx: np.ndarray, positive: int | None = None) -> list[dict]:
    """One run per (fold,) label fraction × seed: trained on that nested subset of `train_idx` (of the
    fold's pool), scored on `test_idx`. (`encoder` is needed only by the modes that train it.)"""
    runs = []
    for fold, pool, val_idx in training_pools(cfg, data, train_idx):
        for fraction in cfg.eval.label_fractions:
            for seed in cfg.eval.seeds:
                chosen = pool[label_subset(data.labels[pool], fraction, seed)]
                probs = predict(cfg, encoder, data, features, chosen, test_idx, seed, val_idx)
                metrics = classification_metrics(data.labels[test_idx], probs, data.classes, positive)
                run = {"label_fraction": fraction, "seed": seed, "n_labelled": int(len(chosen)),
                       "metrics": metrics}
                runs.append(run if fold is None else {**run, "fold": fold})
    return runs


def predict(cfg: Config, encoder: nn.Module, data: LabelledSet, features: np.ndarray,
            chosen: np.ndarray, test_idx: np.ndarray, seed: int,
            val_idx: np.ndarray | None = None) -> np.ndarray:
    """Test-set class probabilities (N_test, K) after training on the samples `chosen`; the trained modes
    keep the weights of the epoch with the lowest loss on `val_idx` when it is given."""
    n_classes = len(data.classes)
    y = data.labels[chosen]
    if cfg.eval.mode in ("linear", "knn"):
        if len(np.unique(y)) < 2:
            raise DataError(f"the training split holds a single class ({data.classes[y[0]]}); "
                            "the test split took every sample of the others")
        if cfg.eval.mode == "linear":
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced",
                                                                       random_state=seed))
        else:
            # Distance-weighted votes: with few labels (k close to the subset size) a plain vote ties.
            model = KNeighborsClassifier(n_neighbors=min(cfg.eval.knn_k, len(chosen)), metric="cosine",
                                         weights="distance", algorithm="brute")
        model.fit(features[chosen], y)
        probs = np.zeros((len(test_idx), n_classes))
        probs[:, model.classes_] = model.predict_proba(features[test_idx])
        return probs
    width = feature_dim(encoder, cfg.data.crop_size)
    torch.manual_seed(seed)
    if cfg.eval.mode == "fusion":
        model = FusionClassifier(encoder, data.images.shape[1], width, n_classes,
                                 shared=cfg.eval.fusion_shared, cross_attention=cfg.eval.fusion_attention,
                                 head=cfg.eval.head)
    else:
        model = LocatedClassifier(copy.deepcopy(encoder), classifier_head(width, n_classes, cfg.eval.head))
    model = model.to(device_of(encoder))
    where = data.locations if needs_location(encoder) else None
    validation = None if val_idx is None else (data.images[val_idx], data.labels[val_idx],
                                               located(where, val_idx))
    train_classifier(model, data.images[chosen], y, cfg, seed, n_classes, validation, located(where, chosen))
    return predict_proba(model, data.images[test_idx], cfg.eval.batch_size, located(where, test_idx))


class LocatedClassifier(nn.Module):
    """Encoder then classifier head; the encoder gets each sample's location when one is given."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor, location: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x) if location is None else self.encoder(x, location=location))


def located(locations: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if locations is None else locations[idx]


def run_model(model: nn.Module, x: torch.Tensor, locations: np.ndarray | None, idx) -> torch.Tensor:
    """`model` on a batch, with the batch's locations (host arrays) when there are any."""
    if locations is None:
        return model(x)
    return model(x, location=torch.as_tensor(locations[idx]))


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (K · n_c) for the classes present (scikit-learn's "balanced"), 0 for an absent class."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: Config, seed: int,
                     n_classes: int, validation: tuple | None = None,
                     locations: np.ndarray | None = None) -> None:
    """Cross-entropy (class-weighted with `eval.class_weighted`) for `eval.epochs`: AdamW with cosine
    decay, or Adam at a constant rate. With `validation` (images, labels, locations or None), the weights
    of the epoch with the lowest validation loss are kept. `locations` (N, 3) go to the encoder."""
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    batch = cfg.eval.batch_size
    # A last batch of one sample would break batch statistics in networks that use them.
    drop_last = len(x) > batch and len(x) % batch == 1
    steps_per_epoch = len(x) // batch if drop_last else math.ceil(len(x) / batch)
    if cfg.eval.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.eval.lr)
        schedule = None
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.eval.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, cfg.eval.epochs * steps_per_epoch))
    weight = class_weights(labels, n_classes).to(device) if cfg.eval.class_weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    best_loss, best_state = math.inf, None
    for _ in range(cfg.eval.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            loss = loss_fn(run_model(model, x[idx].to(device), locations, idx.numpy()), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        if validation is not None:
            val_images, val_labels, *val_locations = validation
            val_loss = validation_loss(model, val_images, val_labels, loss_fn, batch, *val_locations)
            if val_loss < best_loss:
                best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)


@torch.no_grad()
def validation_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray, loss_fn: nn.Module,
                    batch_size: int, locations: np.ndarray | None = None) -> float:
    model.eval()
    device = device_of(model)
    logits = torch.cat([run_model(model, torch.from_numpy(images[i:i + batch_size]).to(device), locations,
                                  slice(i, i + batch_size))
                        for i in range(0, len(images), batch_size)])
    return float(loss_fn(logits, torch.from_numpy(labels).to(device)))


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int,
                  locations: np.ndarray | None = None) -> np.ndarray:
    model.eval()
    device = device_of(model)
    chunks = [torch.softmax(run_model(model, torch.from_numpy(images[i:i + batch_size]).to(device), locations,
                                      slice(i, i + batch_size)), dim=1).cpu().numpy()
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

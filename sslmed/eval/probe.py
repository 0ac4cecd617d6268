"""Downstream evaluation of an encoder at several label fractions and seeds.

Modes (`eval.mode`):

* `linear` — logistic regression (scikit-learn) on standardised frozen features, classes weighted
  inversely to their frequency (scarce-label subsets of clinical data are rarely balanced);
* `knn` — cosine k-nearest-neighbour vote (`eval.knn_k`, weighted by 1/distance) on frozen features;
* `finetune` — the encoder and a linear head trained end to end (`eval.epochs`, `eval.lr`, `eval.batch_size`);
* `fusion` — one copy of the encoder per input branch (`eval.branches`), features concatenated, a
  classifier on top, all trained end to end (a multi-sequence fusion model).

Every (label fraction, seed) pair trains on its nested subset of one fixed training split and is scored
on one fixed test split (`subsets.py`). The frozen test embeddings are also clustered (k-means) and
compared with the labels. Everything lands in `RUN/metrics.json`.
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
from sslmed.errors import DataError
from sslmed.eval.encoders import build_encoder, device_of, extract_features, feature_dim
from sslmed.eval.labelled import LabelledSet, load_labelled
from sslmed.eval.metrics import classification_metrics, clustering_metrics
from sslmed.eval.reports import summarise, summary_table, write_json_atomic
from sslmed.eval.subsets import label_subset, split_train_test

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc")


class BranchClassifier(nn.Module):
    """One encoder per input channel, features concatenated, then a normalised linear classifier."""

    def __init__(self, encoders: list[nn.Module], width: int, n_classes: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(encoders)
        total = width * len(encoders)
        self.head = nn.Sequential(nn.LayerNorm(total), nn.Linear(total, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [branch(x[:, i:i + 1]) for i, branch in enumerate(self.branches)]
        return self.head(torch.cat(features, dim=1))


def finetune(cfg: Config) -> dict:
    """Evaluate `cfg.eval.encoder` on `cfg.eval.data` for every label fraction × seed; write metrics.json."""
    data = load_labelled(cfg)
    train_idx, test_idx = split_train_test(data.labels, cfg.eval.test_fraction, data.groups)
    encoder = build_encoder(cfg, seed=cfg.train.seed).to(_device())
    features = extract_features(encoder, data.images, cfg.eval.batch_size)
    runs = probe_runs(cfg, encoder, data, features, train_idx, test_idx)
    report = {
        "encoder": cfg.eval.encoder, "mode": cfg.eval.mode, "data": cfg.eval.data, "classes": data.classes,
        "n_train": int(len(train_idx)), "n_test": int(len(test_idx)), "runs": runs,
        "summary": summarise(runs, SUMMARY_METRICS),
        "clustering": clustering_metrics(features[test_idx], data.labels[test_idx],
                                         cfg.eval.clusters or len(data.classes), seed=cfg.train.seed),
    }
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "metrics.json", report)
    print(summary_table(report), f"\nwrote {run_dir / 'metrics.json'}", sep="\n")
    return report


def probe_runs(cfg: Config, encoder: nn.Module | None, data: LabelledSet, features: np.ndarray,
               train_idx: np.ndarray, test_idx: np.ndarray) -> list[dict]:
    """One run per label fraction × seed: trained on that nested subset of `train_idx`, scored on
    `test_idx`. (`encoder` is needed only by the modes that train it.)"""
    runs = []
    for fraction in cfg.eval.label_fractions:
        for seed in cfg.eval.seeds:
            chosen = train_idx[label_subset(data.labels[train_idx], fraction, seed)]
            probs = predict(cfg, encoder, data, features, chosen, test_idx, seed)
            runs.append({"label_fraction": fraction, "seed": seed, "n_labelled": int(len(chosen)),
                         "metrics": classification_metrics(data.labels[test_idx], probs, data.classes)})
    return runs


def predict(cfg: Config, encoder: nn.Module, data: LabelledSet, features: np.ndarray,
            chosen: np.ndarray, test_idx: np.ndarray, seed: int) -> np.ndarray:
    """Test-set class probabilities (N_test, K) after training on the samples `chosen`."""
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
    branches = [copy.deepcopy(encoder) for _ in range(data.images.shape[1])]
    torch.manual_seed(seed)
    model = BranchClassifier(branches, width, n_classes).to(device_of(encoder))
    train_classifier(model, data.images[chosen], y, cfg, seed)
    return predict_proba(model, data.images[test_idx], cfg.eval.batch_size)


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: Config,
                     seed: int) -> None:
    """Cross-entropy, AdamW, cosine learning-rate decay over `eval.epochs`."""
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    batch = cfg.eval.batch_size
    # A last batch of one sample would break batch statistics in networks that use them.
    drop_last = len(x) > batch and len(x) % batch == 1
    steps_per_epoch = len(x) // batch if drop_last else math.ceil(len(x) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.eval.lr, weight_decay=0.01)
    total_steps = max(1, cfg.eval.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(cfg.eval.epochs):
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            loss = loss_fn(model(x[idx].to(device)), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    model.eval()
    device = device_of(model)
    chunks = [torch.softmax(model(torch.from_numpy(images[i:i + batch_size]).to(device)), dim=1).cpu().numpy()
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

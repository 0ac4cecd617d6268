"""`sslmed demo`: the whole pipeline on real MRI volumes, on this machine.

1. pack the MNI152 2009 T1 template and its grey/white-matter maps (shipped in the nilearn wheel);
2. pretrain an MAE on them through the DeepSpeed engine, export the encoder;
3. a downstream task that needs anatomical context: crops around the 300 Seitzman-2018 ROI centres
   (MNI coordinates, jittered), labelled cortex / subcortical nuclei / cerebellum. The intensity at a
   crop's centre barely separates these (all are grey matter), the surroundings do. Train and test are
   split by ROI, never by crop, so no region is on both sides;
4. linear probes at several label fractions and seeds: pretrained encoder vs the same architecture at
   random init vs an intensity-only baseline (mean of the central 3³ voxels). Table + PNG + JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sslmed.errors import DataError

# Seitzman-2018 anatomical codes → demo classes (left/right merged: the 2009 template is symmetric).
ROI_CLASSES = ("cortex", "subcortical", "cerebellum")
_SEITZMAN_CODE_TO_CLASS = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1, 7: 2}


@dataclass
class RoiSet:
    crops: np.ndarray  # (N, S, S, S) float32, normalised intensity
    labels: np.ndarray  # (N,) class index into ROI_CLASSES
    groups: np.ndarray  # (N,) ROI index: crops of one ROI never straddle train/test


def nilearn_data_dir() -> Path:
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data"


def seitzman_rois() -> tuple[np.ndarray, np.ndarray]:
    """(300, 3) MNI coordinates in mm and (300,) class indices into ROI_CLASSES."""
    folder = nilearn_data_dir()
    table = folder / "seitzman_2018_ROIs_300inVol_MNI_allInfo.txt"
    codes_file = folder / "seitzman_2018_ROIs_anatomicalLabels.txt"
    if not table.exists() or not codes_file.exists():
        raise DataError(f"the Seitzman-2018 ROI tables are missing from {folder}; reinstall nilearn")
    coords = np.loadtxt(table, skiprows=1, usecols=(0, 1, 2), dtype=np.float64)
    codes = [int(token) for token in codes_file.read_text().split()[1:]]
    if len(codes) != len(coords):
        raise DataError(f"{codes_file}: {len(codes)} labels for {len(coords)} ROIs")
    return coords, np.array([_SEITZMAN_CODE_TO_CLASS[c] for c in codes])


def roi_crops(dataset, key: str, size: int, per_roi: int, jitter_mm: float, seed: int) -> RoiSet:
    """Crops of `size`³ voxels around jittered ROI centres of the packed volume `key`."""
    coords, classes = seitzman_rois()
    meta = dataset.meta(key)
    world_to_voxel = np.linalg.inv(np.asarray(meta["affine"], dtype=np.float64))
    rng = np.random.default_rng(seed)
    crops, labels, groups = [], [], []
    for roi, (centre_mm, label) in enumerate(zip(coords, classes, strict=True)):
        for _ in range(per_roi):
            jittered = centre_mm + rng.uniform(-jitter_mm, jitter_mm, size=3)
            voxel = world_to_voxel @ np.append(jittered, 1.0)
            start = np.round(voxel[:3]).astype(int) - size // 2
            crops.append(dataset.read_crop(key, start, (size, size, size)))
            labels.append(label)
            groups.append(roi)
    return RoiSet(np.stack(crops).astype(np.float32), np.array(labels), np.array(groups))


@torch.no_grad()
def encode(encoder: torch.nn.Module, crops: np.ndarray, batch: int = 64) -> np.ndarray:
    encoder.eval()
    features = [encoder(torch.from_numpy(crops[i:i + batch]).unsqueeze(1)).float().numpy()
                for i in range(0, len(crops), batch)]
    return np.concatenate(features)


def central_intensity(crops: np.ndarray) -> np.ndarray:
    """The intensity-only baseline's one feature: the mean of the central 3³ voxels."""
    c = crops.shape[-1] // 2
    return crops[:, c - 1:c + 2, c - 1:c + 2, c - 1:c + 2].mean(axis=(1, 2, 3))[:, None]


# ---- the run ------------------------------------------------------------------------------------

FRACTIONS = (0.05, 0.1, 0.25, 1.0)
SEEDS = (0, 1, 2)
ENCODERS = ("pretrained", "random-init", "intensity-only")
CROPS_PER_ROI = 8
SWEEP_CROPS_PER_ROI = 2  # crops per ROI in the labelled folder for `sslmed sweep sweep-demo`
JITTER_MM = 4.0


def run_demo(out: str | Path = "demo-out", quick: bool = False) -> dict:
    """Pack → pretrain → export → ROI-context probes; prints the table, writes results.{md,json,png}."""
    from sslmed.config import load_config
    from sslmed.data.sources import open_dataset
    from sslmed.io.pack import pack
    from sslmed.io.synthetic import mni152_paths
    from sslmed.train.loop import pretrain

    out = Path(out)
    started = time.perf_counter()
    unlabeled = out / "unlabeled"
    say(f"[1/4] packing the MNI152 2009 T1 template and tissue maps (nilearn) at 2 mm → {unlabeled}")
    pack([str(p) for p in mni152_paths()], str(unlabeled), fmt="wds", spacing=(2.0, 2.0, 2.0),
         modality="mr", dtype="int16")

    overrides = [f"run.dir={out / 'pretrain'}", f"data.path={unlabeled}"]
    if quick:
        overrides += ["train.steps=6", "train.micro_batch=4", "checkpoint.every=3"]
    cfg = load_config("demo", overrides)
    say(f"[2/4] MAE pretraining, {cfg.train.steps} steps through the DeepSpeed engine → {cfg.run.dir}")
    run_dir = pretrain(cfg)

    say("[3/4] crops around the 300 Seitzman-2018 ROI centres of the T1 template (split by ROI)")
    dataset = open_dataset(unlabeled)
    t1_key = next(k for k in dataset.keys if "_t1_" in k)
    rois = roi_crops(dataset, t1_key, cfg.data.crop_size, 2 if quick else CROPS_PER_ROI, JITTER_MM, seed=0)

    write_labelled_folder(rois, out / "rois", per_roi=SWEEP_CROPS_PER_ROI)

    say("[4/4] linear probes at label fractions " + ", ".join(f"{f:g}" for f in FRACTIONS))
    features = roi_features(cfg, run_dir / "encoder.safetensors", rois.crops)
    results = probe_all(cfg, rois, features, seeds=SEEDS[:1] if quick else SEEDS)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(out, results)
    say(results["table"])
    say(f"done in {results['seconds']:.0f} s: {out / 'results.md'}, {out / 'results.png'}, "
        f"TensorBoard logs in {run_dir / 'tb'}")
    return results


def write_labelled_folder(rois: RoiSet, folder: Path, per_roi: int) -> None:
    """The first `per_roi` crops of every ROI as .npy files + labels.csv (path, label, group=ROI): the
    labelled set `sslmed sweep sweep-demo` evaluates on, so a sweep runs on the same real volumes."""
    from sslmed.eval.reports import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    lines, seen = ["path,label,group"], np.zeros(rois.groups.max() + 1, dtype=int)
    for index, (crop, label, roi) in enumerate(zip(rois.crops, rois.labels, rois.groups, strict=True)):
        if seen[roi] == per_roi:
            continue
        seen[roi] += 1
        name = f"roi{roi:03d}-{index}.npy"
        np.save(folder / name, crop.astype(np.float16))
        lines.append(f"{name},{ROI_CLASSES[label]},roi{roi:03d}")
    write_text_atomic(folder / "labels.csv", "\n".join(lines) + "\n")  # last: its presence means complete


def say(text: str) -> None:
    print(text, flush=True)


def roi_features(cfg, encoder_path: Path, crops: np.ndarray) -> dict[str, np.ndarray]:
    import sslmed
    from sslmed.eval.encoders import extract_features
    from sslmed.models import build_backbone

    images = crops[:, None]
    torch.manual_seed(cfg.train.seed)  # the same random init the pretrained encoder started from
    return {
        "pretrained": extract_features(sslmed.load_encoder(encoder_path), images, batch_size=64),
        "random-init": extract_features(build_backbone(cfg), images, batch_size=64),
        "intensity-only": central_intensity(crops),
    }


def probe_all(cfg, rois: RoiSet, features: dict[str, np.ndarray], seeds) -> dict:
    """Linear probe per encoder × label fraction × seed on one ROI-grouped train/test split."""
    from sslmed.eval.labelled import LabelledSet
    from sslmed.eval.metrics import classification_metrics, clustering_metrics
    from sslmed.eval.probe import predict
    from sslmed.eval.subsets import label_subset, split_train_test

    cfg.eval.mode = "linear"
    data = LabelledSet(rois.crops[:, None], rois.labels, list(ROI_CLASSES), rois.groups,
                       [str(i) for i in range(len(rois.labels))])
    train_idx, test_idx = split_train_test(rois.labels, cfg.eval.test_fraction, rois.groups)
    rows = []
    for name, feats in features.items():
        for fraction in FRACTIONS:
            for seed in seeds:
                chosen = train_idx[label_subset(rois.labels[train_idx], fraction, seed)]
                probs = predict(cfg, None, data, feats, chosen, test_idx, seed)
                scores = classification_metrics(rois.labels[test_idx], probs, list(ROI_CLASSES))
                rows.append({"encoder": name, "label_fraction": fraction, "seed": seed,
                             "n_labelled": int(len(chosen)),
                             **{k: scores[k] for k in ("balanced_accuracy", "macro_f1", "auroc")}})
    clusters = {name: clustering_metrics(feats[test_idx], rois.labels[test_idx], len(ROI_CLASSES))
                for name, feats in features.items()}
    return {"rows": rows, "clustering": clusters, "n_train_rois": len(np.unique(rois.groups[train_idx])),
            "n_test_rois": len(np.unique(rois.groups[test_idx])), "n_crops": len(rois.labels),
            "table": table(rows, clusters)}


def table(rows: list[dict], clusters: dict) -> str:
    """Balanced accuracy (mean ± std over seeds) per label fraction and encoder, markdown."""
    head = "| label fraction | " + " | ".join(ENCODERS) + " |"
    lines = [head, "|" + "---|" * (len(ENCODERS) + 1)]
    for fraction in FRACTIONS:
        cells = []
        for name in ENCODERS:
            values = [r["balanced_accuracy"] for r in rows if r["encoder"] == name
                      and r["label_fraction"] == fraction]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}")
        lines.append(f"| {fraction:g} | " + " | ".join(cells) + " |")
    nmi = " | ".join(f"{clusters[name]['nmi']:.3f}" for name in ENCODERS)
    lines.append(f"| k-means NMI (test) | {nmi} |")
    return ("Balanced accuracy, cortex / subcortical / cerebellum, test ROIs unseen in training "
            "(chance 0.333):\n\n" + "\n".join(lines))


def write_results(out: Path, results: dict) -> None:
    from sslmed.eval.reports import write_json_atomic, write_text_atomic

    write_json_atomic(out / "results.json", {k: v for k, v in results.items() if k != "table"})
    write_text_atomic(out / "results.md", results["table"] + "\n")
    plot(results["rows"], out / "results.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ENCODERS:
        means, stds = [], []
        for fraction in FRACTIONS:
            values = [r["balanced_accuracy"] for r in rows if r["encoder"] == name
                      and r["label_fraction"] == fraction]
            means.append(np.mean(values))
            stds.append(np.std(values))
        ax.errorbar(FRACTIONS, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.axhline(1 / len(ROI_CLASSES), color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("label fraction")
    ax.set_ylabel("balanced accuracy (test ROIs)")
    ax.set_title("ROI context task on MNI152: pretrained vs baselines")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

"""`sslmed demo`: the whole pipeline on real MRI volumes, on this machine.

1. pack the MNI152 2009 T1 template and its grey/white-matter maps (shipped in the nilearn wheel) at
   their native 1 mm: the pretraining pool;
2. pack a second, real subject — the ITK example T1 shipped with sslmed, brain-extracted with its own
   skull strip like the template, resampled to 1 mm — registered to the template (`--atlas`). It is
   never pretrained on;
3. pretrain (the `demo` config: a shortened `brain-mri-cpu`) through the DeepSpeed engine, export;
4. a downstream task that needs anatomical context: crops around the 300 Seitzman-2018 ROI centres
   (MNI coordinates, jittered), labelled cortex / subcortical nuclei / cerebellum. The intensity at a
   crop's centre barely separates these (all are grey matter), the surroundings do. Two tables:
   * same template: train and test crops from the template, split by ROI;
   * cross-subject: the probe trains on the template's crops and is tested on the second subject's
     crops at the same anatomical places (ROI centres mapped through the registration);
   every crop carries its atlas location (template millimetres scaled to [−1, 1]), which a
   location-conditioned encoder is given;
5. linear probes (sslmed.eval) at several label fractions and seeds: pretrained encoder vs the same
   architecture at random init vs an intensity-only baseline (mean of the central 3³ voxels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmed.errors import DataError

# Seitzman-2018 anatomical codes → demo classes (left/right merged: the 2009 template is symmetric).
ROI_CLASSES = ("cortex", "subcortical", "cerebellum")
_SEITZMAN_CODE_TO_CLASS = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1, 7: 2}

FRACTIONS = (0.01, 0.1, 0.25, 1.0)
SEEDS = (0, 1, 2)
ENCODERS = ("pretrained", "random-init", "intensity-only")
TASKS = ("same-template", "cross-subject")
CROPS_PER_ROI = 8
SWEEP_CROPS_PER_ROI = 2  # crops per ROI in the labelled folder for `sslmed sweep sweep-demo`
JITTER_MM = 4.0
SUBJECT_SPACING = (1.0, 1.0, 1.0)  # the second subject at the template's resolution


@dataclass
class RoiSet:
    crops: np.ndarray  # (N, S, S, S) float32, normalised intensity
    labels: np.ndarray  # (N,) class index into ROI_CLASSES
    groups: np.ndarray  # (N,) ROI index: crops of one ROI never straddle train/test
    centres: np.ndarray  # (N, 3) voxel index of each crop's centre in its volume
    locations: np.ndarray  # (N, 3) float32: each crop's atlas location in [-1, 1]


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


def template_to_voxel(meta: dict) -> np.ndarray:
    """4×4 map from template millimetres to voxel indices of a packed volume: through its registration
    when it was packed with an atlas, else its own affine (the volume is the template)."""
    to_template = meta.get("atlas_affine", meta["affine"])
    return np.linalg.inv(np.asarray(to_template, dtype=np.float64))


def atlas_meta(meta: dict) -> dict:
    """`meta` with its atlas registration; a volume packed without one is the template itself: its own
    affine, and the template's extent as the bounds locations are scaled by."""
    if "atlas_affine" in meta:
        return meta
    from sslmed.io.register import world_bounds

    return {**meta, "atlas_affine": meta["affine"],
            "atlas_bounds": world_bounds(meta["shape"], np.asarray(meta["affine"])).tolist()}


def roi_crops(dataset, key: str, size: int, per_roi: int, jitter_mm: float, seed: int) -> RoiSet:
    """Crops of `size`³ voxels of the packed volume `key` around jittered ROI centres (template mm,
    mapped into the volume), with their atlas locations. The jitter depends on `seed` only, so two
    volumes get the same places."""
    from sslmed.data.stages import location

    coords, classes = seitzman_rois()
    meta = atlas_meta(dataset.meta(key))
    to_voxel = template_to_voxel(meta)
    rng = np.random.default_rng(seed)
    crops, labels, groups, centres, locations = [], [], [], [], []
    for roi, (centre_mm, label) in enumerate(zip(coords, classes, strict=True)):
        for _ in range(per_roi):
            jittered = centre_mm + rng.uniform(-jitter_mm, jitter_mm, size=3)
            centre = np.round((to_voxel @ np.append(jittered, 1.0))[:3]).astype(int)
            start = centre - size // 2
            crops.append(dataset.read_crop(key, start, (size, size, size)))
            labels.append(label)
            groups.append(roi)
            centres.append(centre)
            locations.append(location(start, meta["shape"], size, meta))
    return RoiSet(np.stack(crops).astype(np.float32), np.array(labels), np.array(groups), np.array(centres),
                  np.stack(locations).astype(np.float32))


def central_intensity(crops: np.ndarray) -> np.ndarray:
    """The intensity-only baseline's one feature: the mean of the central 3³ voxels."""
    c = crops.shape[-1] // 2
    return crops[:, c - 1:c + 2, c - 1:c + 2, c - 1:c + 2].mean(axis=(1, 2, 3))[:, None]


# ---- the run ------------------------------------------------------------------------------------


def run_demo(out: str | Path = "demo-out", quick: bool = False, config: str = "demo") -> dict:
    """Pack → register → pretrain (`config`, e.g. the full `brain-mri-cpu`) → export → probes on two
    tasks; prints both tables, writes results.{md,json,png}."""
    from sslmed.config import load_config
    from sslmed.data.sources import open_dataset
    from sslmed.train.loop import pretrain

    out = Path(out)
    started = time.perf_counter()
    unlabeled, subject = pack_volumes(out)

    fractions, seeds = (FRACTIONS, SEEDS[:1]) if quick else (FRACTIONS, SEEDS)
    overrides = [f"run.dir={out / 'pretrain'}", f"data.path={unlabeled}",
                 f"eval.label_fractions={list(fractions)}", f"eval.seeds={list(seeds)}", "eval.mode=linear"]
    if quick:
        overrides += ["train.steps=6", "train.micro_batch=4", "checkpoint.every=3"]
    cfg = load_config(config, overrides)
    say(f"[3/5] {cfg.method.name} pretraining, {cfg.train.steps} steps through the DeepSpeed engine → "
        f"{cfg.run.dir}")
    run_dir = pretrain(cfg)

    say("[4/5] crops around the 300 Seitzman-2018 ROI centres: template, and the subject at mapped centres")
    per_roi = 2 if quick else CROPS_PER_ROI
    size = cfg.data.crop_size
    templates = open_dataset(unlabeled)
    t1_key = next(k for k in templates.keys if "_t1_" in k)
    template_rois = roi_crops(templates, t1_key, size, per_roi, JITTER_MM, seed=0)
    subjects = open_dataset(subject)
    subject_rois = roi_crops(subjects, subjects.keys[0], size, per_roi, JITTER_MM, seed=1)
    write_labelled_folder(template_rois, out / "rois", per_roi=SWEEP_CROPS_PER_ROI)

    say("[5/5] linear probes at label fractions " + ", ".join(f"{f:g}" for f in fractions))
    encoders = demo_encoders(cfg, run_dir / "encoder.safetensors")
    results = {"tasks": {
        "same-template": same_template_task(cfg, encoders, template_rois),
        "cross-subject": cross_subject_task(cfg, encoders, template_rois, subject_rois),
    }}
    results["registration_metric"] = subjects.meta(subjects.keys[0])["atlas_metric"]
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["table"] = tables(results["tasks"])
    write_results(out, results)
    say(results["table"])
    say(f"done in {results['seconds']:.0f} s: {out / 'results.md'}, {out / 'results.png'}, "
        f"TensorBoard logs in {run_dir / 'tb'}")
    return results


def pack_volumes(out: Path, tags: Path | None = None, atlas_pool: bool = False) -> tuple[Path, Path]:
    """Steps 1 and 2: (pretraining pool, registered second subject) packed under `out`; `tags` (a CSV for
    `sslmed pack --tags`) tags the pool's volumes; `atlas_pool` registers the pool to the template too
    (for methods that sample an atlas grid)."""
    from sslmed.io.pack import pack
    from sslmed.io.synthetic import mni152_paths, write_itk_t1_brain

    unlabeled, subject = out / "unlabeled", out / "subject"
    template = mni152_paths()[0]
    say(f"[1/5] packing the MNI152 2009 T1 template and tissue maps (nilearn) at 1 mm → {unlabeled}")
    pack([str(p) for p in mni152_paths()], str(unlabeled), fmt="wds", modality="mr", dtype="int16",
         tags=tags, atlas=str(template) if atlas_pool else None)
    say(f"[2/5] packing a second subject (ITK example T1) at 1 mm, registered to the template → {subject}")
    brain = write_itk_t1_brain(out / "volumes")
    summary = pack([str(brain)], str(subject), fmt="wds", spacing=SUBJECT_SPACING, modality="mr",
                   dtype="int16", atlas=str(template))
    if summary["ok"] != 1:
        raise DataError("the second subject could not be registered to the template: "
                        f"see {subject / 'report.jsonl'}")
    return unlabeled, subject


def write_labelled_folder(rois: RoiSet, folder: Path, per_roi: int) -> None:
    """The first `per_roi` crops of every ROI as .npy files + labels.csv (path, label, group=ROI, atlas
    location x, y, z): the labelled set `sslmed sweep sweep-demo` evaluates on, so a sweep runs on the
    same real volumes."""
    from sslmed.eval.reports import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,group,location_x,location_y,location_z"]
    seen = np.zeros(rois.groups.max() + 1, dtype=int)
    for index, (crop, label, roi) in enumerate(zip(rois.crops, rois.labels, rois.groups, strict=True)):
        if seen[roi] == per_roi:
            continue
        seen[roi] += 1
        name = f"roi{roi:03d}-{index}.npy"
        np.save(folder / name, crop.astype(np.float16))
        where = ",".join(f"{v:.6f}" for v in rois.locations[index])
        lines.append(f"{name},{ROI_CLASSES[label]},roi{roi:03d},{where}")
    write_text_atomic(folder / "labels.csv", "\n".join(lines) + "\n")  # last: its presence means complete


def say(text: str) -> None:
    print(text, flush=True)


# ---- evaluation through sslmed.eval --------------------------------------------------------------


def demo_encoders(cfg, encoder_path: Path) -> dict:
    """The encoders compared: the exported one, and the same architecture built as the evaluation API
    builds `eval.encoder=random` (same init code, same seed, no training)."""
    from sslmed.config import config_from_dict
    from sslmed.eval.encoders import build_encoder

    pretrained = config_from_dict(cfg.to_dict())
    pretrained.eval.encoder = str(encoder_path)
    random_init = config_from_dict(cfg.to_dict())
    random_init.eval.encoder = "random"
    return {"pretrained": build_encoder(pretrained, seed=cfg.train.seed),
            "random-init": build_encoder(random_init, seed=cfg.train.seed)}


def features_of(cfg, encoders: dict, crops: np.ndarray, locations: np.ndarray) -> dict[str, np.ndarray]:
    """Every encoder's features of the crops, each crop at its atlas location (used by
    location-conditioned encoders, dropped by the others)."""
    from sslmed.eval.encoders import extract_features

    found = {name: extract_features(encoder, crops[:, None], cfg.eval.batch_size, locations)
             for name, encoder in encoders.items()}
    return {**found, "intensity-only": central_intensity(crops)}


def probe(cfg, images: np.ndarray, labels: np.ndarray, features: dict[str, np.ndarray],
          train_idx: np.ndarray, test_idx: np.ndarray) -> dict:
    """{encoder: {"runs", "summary", "clustering"}}: linear probes of every encoder's features."""
    from sslmed.eval.labelled import LabelledSet
    from sslmed.eval.metrics import clustering_metrics
    from sslmed.eval.probe import SUMMARY_METRICS, probe_runs
    from sslmed.eval.reports import summarise

    data = LabelledSet(images[:, None], labels, list(ROI_CLASSES), None, [str(i) for i in range(len(labels))])
    report = {}
    for name, feats in features.items():
        runs = probe_runs(cfg, None, data, feats, train_idx, test_idx)
        report[name] = {"runs": runs, "summary": summarise(runs, SUMMARY_METRICS),
                        "clustering": clustering_metrics(feats[test_idx], labels[test_idx], len(ROI_CLASSES))}
    return report


def same_template_task(cfg, encoders: dict, rois: RoiSet) -> dict:
    """Train and test crops from the template, split by ROI (no ROI on both sides)."""
    from sslmed.eval.subsets import split_train_test

    train_idx, test_idx = split_train_test(rois.labels, cfg.eval.test_fraction, rois.groups)
    return {"n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
            "n_train_rois": len(np.unique(rois.groups[train_idx])),
            "n_test_rois": len(np.unique(rois.groups[test_idx])),
            "encoders": probe(cfg, rois.crops, rois.labels,
                              features_of(cfg, encoders, rois.crops, rois.locations), train_idx, test_idx)}


def cross_subject_task(cfg, encoders: dict, template: RoiSet, subject: RoiSet) -> dict:
    """Train on every template crop, test on every crop of the second subject."""
    crops = np.concatenate([template.crops, subject.crops])
    labels = np.concatenate([template.labels, subject.labels])
    locations = np.concatenate([template.locations, subject.locations])
    train_idx = np.arange(len(template.labels))
    test_idx = np.arange(len(template.labels), len(labels))
    return {"n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
            "encoders": probe(cfg, crops, labels, features_of(cfg, encoders, crops, locations), train_idx,
                              test_idx)}


def tables(tasks: dict) -> str:
    from sslmed.eval.reports import comparison_table

    titles = {"same-template": "same template: train and test ROIs of the MNI152 template, split by ROI",
              "cross-subject": "cross-subject: trained on the template, tested on the ITK T1 at mapped ROIs"}
    parts = []
    for task, result in tasks.items():
        summaries = {name: entry["summary"] for name, entry in result["encoders"].items()}
        nmi = {name: entry["clustering"]["nmi"] for name, entry in result["encoders"].items()}
        parts.append(f"Balanced accuracy (mean ± std over seeds), {titles[task]} "
                     f"({result['n_train']} train / {result['n_test']} test crops; chance 0.333):\n\n"
                     + comparison_table(summaries, "balanced_accuracy",
                                        extra_rows={"k-means NMI (test)": nmi}))
    return "\n\n".join(parts)


def write_results(out: Path, results: dict) -> None:
    from sslmed.eval.reports import plot_comparison, write_json_atomic, write_text_atomic

    write_json_atomic(out / "results.json", {k: v for k, v in results.items() if k != "table"})
    write_text_atomic(out / "results.md", results["table"] + "\n")
    panels = {task: {name: entry["summary"] for name, entry in result["encoders"].items()}
              for task, result in results["tasks"].items()}
    plot_comparison(panels, "balanced_accuracy", out / "results.png", chance=1 / len(ROI_CLASSES))

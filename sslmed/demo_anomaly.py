"""`sslmed demo anomaly`: seed 001's headline comparison (CAE-residual SSL against SimCLR, BYOL, SimSiam
and SparK on one 3-D ResNet-18) on real volumes that ship with the packages, on this machine.

1. volumes: the MNI152 2009 T1 template (nilearn) and the ITK example T1 (brain-extracted), at 1 mm;
2. places: crop centres drawn (seeded) where a crop is mostly brain; each crop scaled to [0, 1] by its
   1st–99th percentiles, as the paper scales its sinus crops. An anomalous crop is its place's normal
   crop with one synthetic lesion (`lesions.py`: cyst, polyp-like mass or mucosal-thickening-like rim)
   blended in with the normal crop's scaling, so that it differs from its normal twin inside the
   lesion's mask only;
3. three packed datasets from disjoint places: the labelled *normal* set stage 1's CAE trains on
   (`method.normal_data`), the unlabelled SSL pool (normal and lesioned crops, no labels) and the
   labelled downstream set (normal/anomalous twins, grouped by place so twins never straddle a split);
4. pretraining through the DeepSpeed engine of `residual`, `simclr` (τ 0.07), `byol`, `simsiam` and
   `spark`, each from its `*-resnet18` config on the same backbone (MONAI's ResNet-18, narrowed to
   `model.size=tiny` widths 16/32/64/128 for CPUs) with the same budget of steps × batch on the pool
   (the residual run adds its CAE steps on the labelled normal set, as the paper trains its CAE apart);
5. the paper's protocol through `sslmed.eval.probe.finetune`: the whole encoder plus an MLP head,
   class-weighted cross-entropy, Adam 1e-4, a fixed grouped test split plus k-fold CV on the rest, at
   10 % and 100 % of the labels, several seeds, random init as a reference; AUPRC of `anomalous`.

The last printed line is `auprc10_residual=<x> auprc10_best_baseline=<y>` (mean AUPRC at 10 % labels).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmed.demo import say
from sslmed.errors import DataError
from sslmed.lesions import LESION_KINDS, insert_lesion, keeps_pack_scaling, scale_to_unit

METHODS = ("residual", "simclr", "byol", "simsiam", "spark")
BASELINES = ("simclr", "byol", "simsiam", "spark")
RANDOM_INIT = "random-init"
POSITIVE = "anomalous"
FRACTIONS = (0.1, 1.0)
CROP = 32  # the ResNet's whole downsampling: its last stage is one cell, as 64^3 gives 2^3 in the paper
MIN_BRAIN = 0.7  # fraction of a crop that must be brain for its centre to be a place
BRAIN_LEVEL = 0.05  # normalised intensity above which a voxel counts as brain (the volumes are skull-free)
POOL_ANOMALOUS = 0.3  # fraction of the unlabelled pool's crops that carry a lesion
PLACE_SEED = 1  # places and lesions; pretraining and fine-tuning have seeds of their own


@dataclass(frozen=True)
class Budget:
    cae_places: int  # normal crops stage 1's CAE trains on
    pool_places: int  # unlabelled SSL pool
    labelled_places: int  # downstream: one normal and one anomalous crop per place
    steps: int  # SSL steps of every method (the residual method adds `cae_steps`)
    batch: int
    cae_steps: int
    epochs: int  # fine-tuning epochs
    cv_folds: int
    seeds: tuple[int, ...]  # fine-tuning seeds


FULL = Budget(cae_places=192, pool_places=512, labelled_places=80, steps=300, batch=16, cae_steps=300,
              epochs=12, cv_folds=2, seeds=(0, 1, 2))
QUICK = Budget(cae_places=4, pool_places=8, labelled_places=8, steps=2, batch=4, cae_steps=1, epochs=1,
               cv_folds=2, seeds=(0,))


@dataclass
class CropSet:
    """Crops of one packed dataset: file names, arrays, tags; `masks` holds each lesion's mask."""

    names: list[str]
    crops: list[np.ndarray]
    tags: list[dict[str, str]]
    masks: dict[str, np.ndarray]


# ---- volumes, places, crops ----------------------------------------------------------------------


def demo_volumes(folder: Path) -> dict[str, np.ndarray]:
    """{name: float32 volume in [0, 1] at 1 mm}: the MNI152 T1 template and the brain-extracted ITK T1,
    normalised as `sslmed pack` normalises MR volumes."""
    from sslmed.io.format import to_float
    from sslmed.io.preprocess import preprocess
    from sslmed.io.readers import read_volume
    from sslmed.io.synthetic import mni152_paths, write_itk_t1_brain

    paths = {"mni152": mni152_paths()[0], "itk-t1": write_itk_t1_brain(folder)}
    volumes = {}
    for name, path in paths.items():
        stored, meta = preprocess(read_volume(path), spacing=(1.0, 1.0, 1.0), modality="mr", dtype="float16")
        volumes[name] = to_float(stored, meta["scale"], meta["offset"]).astype(np.float32)
    return volumes


def candidate_centres(volume: np.ndarray, size: int, stride: int = 4) -> np.ndarray:
    """(N, 3) centres on a grid of `stride` voxels whose `size`³ crop lies inside the volume and is at
    least MIN_BRAIN brain."""
    from scipy.ndimage import uniform_filter

    brain = uniform_filter((volume > BRAIN_LEVEL).astype(np.float32), size=size, mode="constant")
    half = size // 2
    axes = [np.arange(half, s - half + 1, stride) for s in volume.shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    # scipy's even window at index c spans [c - size/2, c + size/2), exactly the crop `cut` takes there
    return grid[brain[tuple(grid.T)] >= MIN_BRAIN] if len(grid) else grid


def draw_places(volumes: dict[str, np.ndarray], count: int, size: int, rng: np.random.Generator
                ) -> list[tuple[str, np.ndarray]]:
    """`count` distinct (volume name, centre) places, drawn from both volumes without replacement."""
    pool = [(name, centre) for name, volume in volumes.items() for centre in candidate_centres(volume, size)]
    if len(pool) < count:
        raise DataError(f"only {len(pool)} crop places are mostly brain; the demo needs {count}")
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def cut(volume: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    start = centre - size // 2
    return volume[tuple(slice(a, a + size) for a in start)]


def lesioned_twin(normal: np.ndarray, place: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """(anomalous crop, lesion mask, kind) for the scaled normal crop of place `place`. A lesion that
    would move the crop's 0.5/99.5 percentiles (so that `sslmed pack` would rescale the whole crop) is
    drawn again, so the twins differ inside the mask only, in the packed data too."""
    for _ in range(50):
        kind = LESION_KINDS[int(rng.integers(len(LESION_KINDS)))]
        anomalous, mask = insert_lesion(normal, kind, rng)
        if keeps_pack_scaling(anomalous):
            return anomalous, mask, kind
    raise DataError(f"place {place}: no lesion kept the crop's intensity scaling in 50 draws")


def build_sets(volumes: dict[str, np.ndarray], budget: Budget, size: int = CROP, seed: int = PLACE_SEED
               ) -> dict[str, CropSet]:
    """The three datasets of the demo, from disjoint places: `cae` (normal, tagged status=normal),
    `pool` (unlabelled, POOL_ANOMALOUS of it lesioned) and `labelled` (twins tagged label, place, lesion)."""
    rng = np.random.default_rng(seed)
    total = budget.cae_places + budget.pool_places + budget.labelled_places
    places = draw_places(volumes, total, size, rng)
    sets = {name: CropSet([], [], [], {}) for name in ("cae", "pool", "labelled")}
    for index, (name, centre) in enumerate(places):
        normal = scale_to_unit(cut(volumes[name], centre, size))
        where = {"volume": name, "centre": "-".join(map(str, centre))}
        if index < budget.cae_places:
            add(sets["cae"], f"normal-{index:04d}", normal, {"status": "normal", **where})
        elif index < budget.cae_places + budget.pool_places:
            if rng.random() < POOL_ANOMALOUS:
                normal, mask, _ = lesioned_twin(normal, index, rng)
            add(sets["pool"], f"crop-{index:04d}", normal, {})
        else:
            anomalous, mask, kind = lesioned_twin(normal, index, rng)
            group = {"place": f"place{index:04d}", **where}
            add(sets["labelled"], f"place{index:04d}-normal", normal, {"label": "normal", **group})
            add(sets["labelled"], f"place{index:04d}-anomalous", anomalous,
                {"label": POSITIVE, "lesion": kind, **group}, mask)
    return sets


def add(crop_set: CropSet, name: str, crop: np.ndarray, tags: dict[str, str],
        mask: np.ndarray | None = None) -> None:
    crop_set.names.append(name)
    crop_set.crops.append(crop.astype(np.float32))
    crop_set.tags.append(tags)
    if mask is not None:
        crop_set.masks[name] = mask


def pack_set(crop_set: CropSet, folder: Path, out: Path) -> Path:
    """The crops as .npy files with a tags CSV, packed by `sslmed pack` into `out`; each lesion's mask
    is kept beside its crop as `<name>.mask.npy` (the ground truth of where the anomaly is)."""
    import csv

    from sslmed.io.pack import pack

    folder.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for tags in crop_set.tags for k in tags})
    with open(folder / "tags.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", *columns])
        writer.writeheader()
        for name, crop, tags in zip(crop_set.names, crop_set.crops, crop_set.tags, strict=True):
            np.save(folder / f"{name}.npy", crop)
            if name in crop_set.masks:
                np.save(folder / f"{name}.mask.npy", crop_set.masks[name])
            writer.writerow({"path": f"{name}.npy", **tags})
    files = [str(folder / f"{name}.npy") for name in crop_set.names]
    summary = pack(files, str(out), fmt="wds", modality="mr", dtype="int16",
                   tags=str(folder / "tags.csv") if columns else None)
    if summary["ok"] != len(files):
        raise DataError(f"packing {out}: {summary['ok']} of {len(files)} crops packed; "
                        f"see {out / 'report.jsonl'}")
    return out


# ---- pretraining and fine-tuning -----------------------------------------------------------------


def pretrain_config(method: str, out: Path, pool: Path, cae_set: Path, budget: Budget):
    """The method's `*-resnet18` config at the demo's size and budget (fp32, one process, CPU)."""
    from sslmed.config import load_config

    steps = budget.steps + (budget.cae_steps if method == "residual" else 0)
    overrides = [
        f"run.dir={out / 'runs' / method}", f"data.path={pool}", f"data.crop_size={CROP}", "data.workers=1",
        "data.shuffle_buffer=64", "model.size=tiny", f"train.steps={steps}",
        f"train.micro_batch={budget.batch}",
        "train.precision=fp32", "train.zero_stage=0", "train.activation_checkpointing=false", "train.seed=0",
        "train.log_every=10", f"optim.warmup_steps={max(1, budget.steps // 10)}", f"checkpoint.every={steps}",
        "checkpoint.keep=1", "checkpoint.resume=none",
    ]
    if method == "residual":
        # The CAE's code keeps the paper's compression (512 of 4·8³ at 64³ → 64 of 4·4³ at 32³); a
        # kernel-3 median filter at 32³ covers what kernel 5 covers at the paper's 64³.
        overrides += [f"method.stage1_steps={budget.cae_steps}", f"method.normal_data={cae_set}",
                      "method.normal_tag=status=normal", "method.cae_latent=64", "method.median_kernel=3"]
    if method == "spark":
        overrides += ["model.patch_size=16"]  # a 2³ grid of masked cells, as 32³ patches give at 64³
    return load_config(f"{method}-resnet18", overrides)


def finetune_config(encoder: str, out: Path, labelled: Path, name: str, budget: Budget):
    """The paper's downstream protocol on the labelled twins, for one encoder (a path or 'random')."""
    from sslmed.config import load_config

    return load_config("residual-resnet18", [
        f"run.dir={out / 'eval' / name}", f"data.crop_size={CROP}", "model.size=tiny", "train.seed=0",
        f"eval.encoder={encoder}", f"eval.data={labelled}", "data.label_key=label", "eval.group_key=place",
        "eval.mode=finetune", "eval.head=mlp", "eval.class_weighted=true", "eval.optimizer=adam",
        "eval.lr=0.0001", f"eval.epochs={budget.epochs}", "eval.batch_size=8", "eval.test_fraction=0.25",
        f"eval.cv_folds={budget.cv_folds}", f"eval.label_fractions={list(FRACTIONS)}",
        f"eval.seeds={list(budget.seeds)}", f"eval.positive_label={POSITIVE}",
    ])


def run_anomaly_demo(out: str | Path = "demo-anomaly-out", quick: bool = False) -> dict:
    """Volumes → crops with synthetic lesions → pretrain five methods → fine-tune; prints the table and
    writes results.{md,json,png} in `out`."""
    from sslmed.eval.probe import finetune
    from sslmed.train.loop import pretrain

    out, budget = Path(out), QUICK if quick else FULL
    started, load_before = time.perf_counter(), os.getloadavg()
    say("[1/4] the MNI152 T1 template (nilearn) and the ITK example T1 at 1 mm; crops with synthetic lesions")
    sets = build_sets(demo_volumes(out / "volumes"), budget)
    packed = {name: pack_set(crop_set, out / "crops" / name, out / name) for name, crop_set in sets.items()}
    say(f"      {len(sets['cae'].names)} labelled normal crops (CAE), {len(sets['pool'].names)} unlabelled "
        f"(pool), {len(sets['labelled'].names)} labelled twins ({CROP}³ voxels)")
    seconds = {"data": time.perf_counter() - started}
    encoders = {RANDOM_INIT: "random"}
    for method in METHODS:
        cfg = pretrain_config(method, out, packed["pool"], packed["cae"], budget)
        cae = f" after {budget.cae_steps} CAE steps on the labelled normals" if method == "residual" else ""
        say(f"[2/4] {method}: {budget.steps} steps × {budget.batch} crops on the pool{cae}")
        tick = time.perf_counter()
        encoders[method] = str(pretrain(cfg) / "encoder.safetensors")
        seconds[f"pretrain_{method}"] = time.perf_counter() - tick
    say(f"[3/4] fine-tuning at label fractions {', '.join(f'{f:g}' for f in FRACTIONS)}, seeds "
        f"{list(budget.seeds)}, {budget.cv_folds}-fold CV, fixed test split")
    reports = {}
    for name, encoder in encoders.items():
        tick = time.perf_counter()
        reports[name] = finetune(finetune_config(encoder, out, packed["labelled"], name, budget))
        seconds[f"finetune_{name}"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    results = summarise_results(reports, budget, seconds, load_before)
    write_results(out, results, reports)
    say("[4/4] " + results["table"])
    say(f"done in {seconds['total']:.0f} s: {out / 'results.md'}, {out / 'results.png'}")
    say(results["last_line"])
    return results


# ---- results -------------------------------------------------------------------------------------


def auprc_at(report: dict, fraction: float) -> float:
    return report["summary"][str(fraction)]["auprc"]["mean"]


def summarise_results(reports: dict, budget: Budget, seconds: dict, load_before: tuple) -> dict:
    from sslmed.eval.reports import comparison_table

    residual = auprc_at(reports["residual"], 0.1)
    best = max(BASELINES, key=lambda m: auprc_at(reports[m], 0.1))
    best_auprc = auprc_at(reports[best], 0.1)
    first = reports["residual"]
    prevalence = 0.5  # one anomalous twin per normal crop
    table = (f"AUPRC of the class '{POSITIVE}' (mean ± std over seeds × folds; chance {prevalence}), "
             f"fine-tuned ResNet-18 (tiny widths) + MLP head, {first['n_train']} train / {first['n_test']} "
             f"test crops, {budget.cv_folds}-fold CV, seeds {list(budget.seeds)}:\n\n"
             + comparison_table({name: r["summary"] for name, r in reports.items()}, "auprc",
                                extra_rows={"k-means NMI (test)": {n: r["clustering"]["nmi"]
                                                                  for n, r in reports.items()}}))
    return {
        "table": table, "best_baseline": best, "auprc10_residual": residual,
        "auprc10_best_baseline": best_auprc,
        "last_line": f"auprc10_residual={residual:.3f} auprc10_best_baseline={best_auprc:.3f}",
        "budget": budget.__dict__, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg()},
    }


def write_results(out: Path, results: dict, reports: dict) -> None:
    from sslmed.eval.reports import plot_comparison, write_json_atomic, write_text_atomic

    write_json_atomic(out / "results.json", {**{k: v for k, v in results.items() if k != "table"},
                                              "reports": reports})
    write_text_atomic(out / "results.md", results["table"] + "\n\n" + results["last_line"] + "\n")
    plot_comparison({f"AUPRC ({POSITIVE})": {name: r["summary"] for name, r in reports.items()}}, "auprc",
                    out / "results.png", chance=0.5)

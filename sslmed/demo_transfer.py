"""`sslmed demo sweep-transfer`: every method that pretrains on a brain MRI crop, each with the same budget,
probed on the demo's cross-subject task.

The volumes are the demo's (MNI152 template and tissue maps as the pretraining pool, tagged normal for the
two-stage residual method; the ITK example T1 registered to the template, never pretrained on). Each
method trains from its own shipped config (`<method>-tiny` by default, `--family base` for the full-size
ones) with the budget made equal across methods: the same crop size, steps, crops per step and warm-up, and
the brain recipe's augmentation families (no flips, which mirror anatomy). Its exported encoder and the
same architecture at random init (the evaluation API's `eval.encoder=random`, same init code and seed)
are linear-probed on the template's ROI crops and tested on the second subject's crops at the mapped ROI
centres, at label fractions 1 / 10 / 100 % with three seeds. Writes results.json, results.md (the table)
and results.png under OUT.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sslmed import demo
from sslmed.errors import ConfigError

# Every registered method; all take a single-channel 3-D crop (residual's first stage learns from the
# volumes tagged normal, which the pool's are).
METHODS = ("mae", "sssd", "resmae", "spark", "simclr", "byol", "simsiam", "drasclr", "contrastive_ae",
           "residual")
FRACTIONS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
CROP_SIZE = 32
CROPS_PER_ROI = 4
RECIPE = "brain-mri-cpu"  # the augmentation families every method shares come from this recipe
NORMAL_TAG = ("status", "normal")


def method_config(name: str, family: str, out: Path, pool: Path, steps: int, micro_batch: int,
                  fractions=FRACTIONS, seeds=SEEDS, extra: tuple[str, ...] = ()):
    """`<name>-<family>` with the shared budget and the recipe's augmentation families (then `extra`
    overrides)."""
    from sslmed.config import load_config

    families = load_config(RECIPE).data.augment_families
    warmup = max(1, steps // 10)
    overrides = [f"run.dir={out / 'runs' / name}", f"data.path={pool}", f"data.crop_size={CROP_SIZE}",
                 f"data.augment_families={list(families)}", f"train.steps={steps}",
                 f"train.micro_batch={micro_batch}", f"optim.warmup_steps={warmup}", "checkpoint.every=0",
                 "checkpoint.resume=none", "train.log_every=10", "eval.mode=linear",
                 f"eval.label_fractions={list(fractions)}", f"eval.seeds={list(seeds)}"]
    if name == "residual":
        overrides += [f"method.normal_tag={'='.join(NORMAL_TAG)}",
                      f"method.stage1_steps={max(1, steps // 2)}"]
    return load_config(f"{name}-{family}", [*overrides, *extra])


def write_normal_tags(out: Path) -> Path:
    """Tags CSV marking every pool volume (a healthy template and its tissue maps) as normal."""
    from sslmed.eval.reports import write_text_atomic
    from sslmed.io.synthetic import mni152_paths

    path = out / "pool-tags.csv"
    rows = [f"path,{NORMAL_TAG[0]}"] + [f"{p.name},{NORMAL_TAG[1]}" for p in mni152_paths()]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(rows) + "\n")
    return path


def run_sweep_transfer(out: str | Path = "sweep-transfer-out", steps: int = 300, micro_batch: int = 8,
                       family: str = "tiny", methods: tuple[str, ...] = METHODS, quick: bool = False) -> dict:
    """Pretrain each of `methods` for `steps` × `micro_batch` crops, probe each on the cross-subject task;
    returns (and writes) the results."""
    from sslmed.data.sources import open_dataset
    from sslmed.methods import METHODS as REGISTERED
    from sslmed.train.loop import pretrain

    unknown = [m for m in methods if m not in REGISTERED]
    if unknown:
        raise ConfigError(f"sweep-transfer: unknown methods {unknown} (known: {', '.join(REGISTERED)})")
    out = Path(out)
    started = time.perf_counter()
    grid = any(REGISTERED[m].needs.grid for m in methods)  # an atlas-grid method needs a registered pool
    pool, subject = demo.pack_volumes(out, tags=write_normal_tags(out), atlas_pool=grid)
    templates, subjects = open_dataset(pool), open_dataset(subject)
    t1_key = next(k for k in templates.keys if "_t1_" in k)
    per_roi = 1 if quick else CROPS_PER_ROI
    template_rois = demo.roi_crops(templates, t1_key, CROP_SIZE, per_roi, demo.JITTER_MM, seed=0)
    subject_rois = demo.roi_crops(subjects, subjects.keys[0], CROP_SIZE, per_roi, demo.JITTER_MM, seed=1)
    seeds = SEEDS[:1] if quick else SEEDS
    results = {"steps": steps, "micro_batch": micro_batch, "family": family, "crop_size": CROP_SIZE,
               "crops_per_roi": per_roi, "methods": {}}
    for index, name in enumerate(methods, start=1):
        cfg = method_config(name, family, out, pool, steps, micro_batch, seeds=seeds)
        demo.say(f"[{index}/{len(methods)}] {name} ({cfg.model.arch}): {steps} steps × {micro_batch} crops")
        began, cpu = time.perf_counter(), time.process_time()
        run_dir = pretrain(cfg)
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
        task = demo.cross_subject_task(cfg, demo.demo_encoders(cfg, run_dir / "encoder.safetensors"),
                                       template_rois, subject_rois)
        results["methods"][name] = {
            "arch": cfg.model.arch, "pretrain_seconds": round(seconds, 1),
            "pretrain_cpu_seconds": round(cpu_seconds, 1),
            "summaries": {enc: entry["summary"] for enc, entry in task["encoders"].items()}}
        results["n_train"], results["n_test"] = task["n_train"], task["n_test"]
        write_results(out, results)  # after every method: an interrupted sweep keeps what it measured
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(out, results)
    demo.say(results_table(results))
    demo.say(f"done in {results['seconds']:.0f} s: {out / 'results.md'}, {out / 'results.png'}")
    return results


# ---- reports -------------------------------------------------------------------------------------


def balanced(summary: dict, fraction: float) -> dict:
    """Balanced accuracy at `fraction` of a `summarise` output (keyed by the fraction as text)."""
    return summary[str(float(fraction))]["balanced_accuracy"]


def results_table(results: dict) -> str:
    """Markdown: one row per method, pretrained and random-init balanced accuracy per label fraction, and
    the pretrained − random difference at each fraction (with whether it exceeds the seeds' spread)."""
    from sslmed.eval.reports import format_mean_std

    methods = results["methods"]
    if not methods:
        return "(no method finished)"
    fractions = sorted({float(f) for m in methods.values() for f in m["summaries"]["pretrained"]})
    head = ["method", "arch"] + [f"{label} {f:g}" for f in fractions for label in ("pretrained", "random")] \
        + [f"Δ {f:g}" for f in fractions] + ["pretrain wall s (CPU s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in methods.items():
        pre, rnd = entry["summaries"]["pretrained"], entry["summaries"]["random-init"]
        cells = [name, entry["arch"]]
        cells += [format_mean_std(balanced(s, f)) for f in fractions for s in (pre, rnd)]
        cells += [difference(balanced(pre, f), balanced(rnd, f)) for f in fractions]
        cells.append(f"{entry['pretrain_seconds']:.0f} ({entry['pretrain_cpu_seconds']:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    intensity = next(iter(methods.values()))["summaries"]["intensity-only"]
    lines.append("\nIntensity only (central 3³ mean): "
                 + ", ".join(f"{f:g}: {format_mean_std(balanced(intensity, f))}" for f in fractions))
    return (f"Cross-subject balanced accuracy (mean ± std over label-subset seeds; {results['n_train']} "
            f"template crops for training, {results['n_test']} crops of the second subject for testing; "
            f"chance 0.333). Every method: {results['steps']} steps × {results['micro_batch']} crops of "
            f"{results['crop_size']}³, `<method>-{results['family']}` configs. Δ in bold where it exceeds "
            "the two standard deviations added. CPU s: the training process's (not its loader worker's)."
            "\n\n" + "\n".join(lines))


def difference(pre: dict, rnd: dict) -> str:
    """pretrained − random, in bold beyond the two seed spreads added (never where there is no spread:
    at 100 % of the labels every seed trains on the same crops)."""
    delta = pre["mean"] - rnd["mean"]
    text = f"{delta:+.3f}"
    spread = pre["std"] + rnd["std"]
    return f"**{text}**" if spread > 0 and abs(delta) > spread else text


def write_results(out: Path, results: dict) -> None:
    from sslmed.eval.reports import write_json_atomic, write_text_atomic

    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", results_table(results) + "\n")
    if results["methods"]:
        plot(results, out / "results.png")


def plot(results: dict, path: Path) -> None:
    """One panel per label fraction: each method's pretrained and random-init balanced accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(results["methods"])
    fractions = sorted({float(f) for m in results["methods"].values() for f in m["summaries"]["pretrained"]})
    figure = Figure(figsize=(4.5 * len(fractions), 4), dpi=110)
    FigureCanvasAgg(figure)
    x = np.arange(len(methods))
    for index, fraction in enumerate(fractions, start=1):
        axes = figure.add_subplot(1, len(fractions), index)
        for offset, (encoder, colour) in zip((-0.15, 0.15), (("pretrained", "C0"), ("random-init", "C1")),
                                            strict=True):
            stats = [balanced(results["methods"][m]["summaries"][encoder], fraction) for m in methods]
            axes.errorbar(x + offset, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], fmt="o",
                          capsize=3, color=colour, label=encoder)
        axes.axhline(1 / len(demo.ROI_CLASSES), color="grey", linestyle=":", label="chance")
        axes.set_xticks(x, methods, rotation=60, ha="right")
        axes.set_ylabel("balanced accuracy (cross-subject)")
        axes.set_title(f"{fraction:.0%} of the labels")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)

"""Result files of evaluation runs and sweeps: atomic JSON/CSV, mean ± std tables, plots."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


def write_text_atomic(path: Path, text: str) -> None:
    """Temporary file beside `path`, then rename: readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    """Strict JSON: NaN (an undefined metric) is written as null."""
    write_text_atomic(path, json.dumps(_nan_to_none(obj), indent=1, allow_nan=False) + "\n")


def _nan_to_none(obj: object) -> object:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation over the defined values (std 0 for a single value)."""
    defined = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(defined) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(defined.std(ddof=1)) if len(defined) > 1 else 0.0
    return {"mean": float(defined.mean()), "std": std, "n": int(len(defined))}


def summarise(runs: list[dict], metrics: tuple[str, ...]) -> dict:
    """{label fraction: {metric: mean/std over seeds}} from a probe's per-run results."""
    fractions = sorted({r["label_fraction"] for r in runs})
    return {str(f): {m: mean_std([r["metrics"][m] for r in runs if r["label_fraction"] == f])
                     for m in metrics}
            for f in fractions}


def summary_table(report: dict) -> str:
    """A probe's summary as markdown: one row per label fraction, mean ± std over seeds."""
    metrics = list(next(iter(report["summary"].values())))
    positive = f"; AUROC/AUPRC of class '{report['positive_label']}'" if report.get("positive_label") else ""
    lines = [f"{report['mode']} probe of {report['encoder']} ({report['n_train']} train / {report['n_test']} "
             f"test samples{positive})", "", "| label fraction | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for fraction, stats in report["summary"].items():
        lines.append(f"| {fraction} | " + " | ".join(format_mean_std(stats[m]) for m in metrics) + " |")
    c = report["clustering"]
    lines += ["", f"k-means on test embeddings ({c['n_clusters']} clusters): NMI {c['nmi']:.3f}, "
              f"ARI {c['ari']:.3f}, cluster accuracy {c['cluster_accuracy']:.3f}, silhouette "
              f"{c.get('silhouette', math.nan):.3f}, Davies–Bouldin {c.get('davies_bouldin', math.nan):.3f}"]
    return "\n".join(lines)


def format_mean_std(stats: dict, digits: int = 3) -> str:
    if stats["n"] == 0:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def comparison_table(summaries: dict[str, dict], metric: str,
                     extra_rows: dict[str, dict] | None = None) -> str:
    """Markdown: one row per label fraction, one column per encoder (`summarise` outputs by name),
    mean ± std over seeds; `extra_rows` adds rows of one number per encoder."""
    names = list(summaries)
    fractions = sorted({f for summary in summaries.values() for f in summary}, key=float)
    lines = ["| label fraction | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for fraction in fractions:
        cells = [format_mean_std(summaries[n][fraction][metric]) if fraction in summaries[n] else ""
                 for n in names]
        lines.append(f"| {float(fraction):g} | " + " | ".join(cells) + " |")
    for label, values in (extra_rows or {}).items():
        lines.append(f"| {label} | " + " | ".join(f"{values[n]:.3f}" if n in values else "" for n in names)
                     + " |")
    return "\n".join(lines)


def plot_comparison(panels: dict[str, dict[str, dict]], metric: str, path: Path,
                    chance: float | None = None) -> None:
    """One panel per task ({task: {encoder: summary}}): `metric` vs label fraction, mean ± std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(panels), 4), dpi=110)
    FigureCanvasAgg(figure)
    for index, (task, summaries) in enumerate(panels.items(), start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for name, summary in summaries.items():
            fractions = sorted(summary, key=float)
            axes.errorbar([float(f) for f in fractions], [summary[f][metric]["mean"] for f in fractions],
                          yerr=[summary[f][metric]["std"] for f in fractions], marker="o", capsize=3,
                          label=name)
        if chance is not None:
            axes.axhline(chance, color="grey", linestyle=":", label="chance")
        axes.set_xscale("log")
        axes.set_xlabel("label fraction")
        axes.set_ylabel(metric)
        axes.set_title(task)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)

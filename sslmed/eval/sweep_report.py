"""A sweep's result files: results.csv (one row per trial), results.md (mean ± std over seeds) and
one PNG per headline metric (metric vs label fraction, one line per mask ratio and the random init)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sslmed.eval.reports import format_mean_std, mean_std, write_text_atomic

PLOTTED = ("balanced_accuracy", "auroc")
RANDOM_INIT = "random init"


def encoder_label(row: dict) -> str:
    return RANDOM_INIT if row["encoder"] == "random" else f"mask ratio {row['mask_ratio']:g}"


def write_reports(rows: list[dict], out: Path, metrics: tuple[str, ...]) -> str:
    """Write results.csv, results.md and the plots into `out`; returns the markdown text."""
    columns = ["trial", "label_fraction", "mask_ratio", "seed", "encoder", "status", "error", *metrics]
    frame = pd.DataFrame(rows)
    frame = frame.reindex(columns=[*columns, *(c for c in frame.columns if c not in columns)])
    if "n_labelled" in frame:  # a count, even where failed trials leave it empty
        frame["n_labelled"] = frame["n_labelled"].astype("Int64")
    write_text_atomic(out / "results.csv", frame.to_csv(index=False))
    text = markdown(rows, metrics)
    write_text_atomic(out / "results.md", text)
    for metric in PLOTTED:
        if metric in metrics:
            plot(rows, metric, out / f"{metric}_vs_label_fraction.png")
    return text


def grouped(rows: list[dict], metric: str) -> dict[str, dict[float, dict]]:
    """{encoder label: {label fraction: mean/std over the seeds whose trial succeeded}}."""
    table: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        values = table.setdefault(encoder_label(row), {}).setdefault(row["label_fraction"], [])
        if row["status"] == "ok":
            values.append(row[metric])
    return {label: {f: mean_std(v) for f, v in sorted(by_fraction.items())}
            for label, by_fraction in table.items()}


def _order(labels) -> list[str]:
    """Mask ratios in ascending order, the random-init baseline last."""
    return sorted(labels, key=lambda label: (label == RANDOM_INIT, label))


def markdown(rows: list[dict], metrics: tuple[str, ...]) -> str:
    fractions = sorted({r["label_fraction"] for r in rows})
    lines = [f"# Sweep results: {len(rows)} trials, {sum(r['status'] == 'ok' for r in rows)} ok", ""]
    for metric in metrics:
        stats = grouped(rows, metric)
        lines += [f"## {metric} (mean ± std over seeds)", "",
                  "| encoder | " + " | ".join(f"{100 * f:g}% labels" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for label in _order(stats):
            cells = [format_mean_std(stats[label][f]) if f in stats[label] else "" for f in fractions]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["## Failed trials", ""] + [f"- {r['trial']}: {r['error']}" for r in failed] + [""]
    return "\n".join(lines)


def plot(rows: list[dict], metric: str, path: Path) -> None:
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    stats = grouped(rows, metric)
    for label in _order(stats):
        points = [(f, s) for f, s in stats[label].items() if s["n"] > 0]
        if not points:
            continue
        axes.errorbar([f for f, _ in points], [s["mean"] for _, s in points],
                      yerr=[s["std"] for _, s in points], marker="o", capsize=3, label=label,
                      linestyle="--" if label == RANDOM_INIT else "-")
    axes.set_xscale("log")
    fractions = sorted({r["label_fraction"] for r in rows})
    axes.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
    axes.minorticks_off()
    axes.set_xlabel("label fraction")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} vs label fraction")
    axes.grid(True, alpha=0.3)
    axes.legend()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)

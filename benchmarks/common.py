"""Shared pieces of the benchmarks: machine description, JSON-lines results, tables, the summary line.

Every benchmark appends one JSON object per measured configuration to `benchmarks/results/<name>.jsonl`
(each carrying `machine_info()`), prints a table, and ends with one line of `key=value` pairs that
scripts can parse.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(package: str) -> str | None:
    # Read the installed metadata instead of importing: importing deepspeed takes seconds.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float:
    """1-minute load average: other processes on the machine skew CPU figures, so it is recorded."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import torch

    return {
        "device": device_name(device),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": _version("deepspeed"),
        "monai": _version("monai"),
        "sslmed": _version("sslmed"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def append_results(name: str, records: Iterable[dict[str, Any]],
                   results_dir: str | Path | None = None) -> Path:
    """Append records as JSON lines to `<results_dir>/<name>.jsonl`; the file is replaced atomically."""
    directory = Path(results_dir) if results_dir else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    existing = path.read_text() if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(existing + lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1e5 or magnitude < 1e-3:
            return f"{value:.3g}"
        return f"{value:.3f}" if magnitude < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain, right-aligned text table of `columns` taken from each row."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    header = "  ".join(column.rjust(width) for column, width in zip(columns, widths, strict=True))
    rule = "  ".join("-" * width for width in widths)
    body = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join([header, rule, *body])


def summary_line(values: dict[str, Any]) -> str:
    """`k=v k=v ...`: floats to 4 significant digits, missing values as `nan`."""
    parts = []
    for key, value in values.items():
        if value is None:
            text = "nan"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value).replace(" ", "_")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def parse_summary(line: str) -> dict[str, str]:
    """The inverse of `summary_line` (values stay strings)."""
    return dict(part.split("=", 1) for part in line.split())

"""Shared pieces of the benchmarks: machine description, JSON-lines results, tables, the summary line.

Every benchmark appends one JSON object per measured configuration to `benchmarks/results/<name>.jsonl`
(each carrying `machine_info()`), prints a table, and ends with one line of `key=value` pairs that
scripts can parse.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name;
# the first matching substring wins, so specific names come before general ones.
GPU_BF16_PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("H800", 989.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("A6000", 155.0),
]

RESULTS_DIR = Path("benchmarks") / "results"  # under the current directory: a checkout's own results


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


# ---- peak FLOP/s --------------------------------------------------------------------------------------


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the datasheet table on GPU, a matmul measured on CPU."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_BF16_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"datasheet dense bf16 ({key})"
        return float("nan"), f"unknown GPU '{name}': no peak in the table"
    return measured_matmul_peak(dtype), f"measured {dtype_name(dtype)} matmul on CPU"


def measured_matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    """Best FLOP/s of an n×n×n matmul in `dtype` on this CPU: the attainable peak, not a datasheet one.
    Many short matmuls, best taken: on a shared machine a long one is time-sliced and reads low."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def dtype_name(dtype: torch.dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

"""Run logs: RUN/metrics.jsonl (one JSON line per logged step) and RUN/tb/ (TensorBoard scalars)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by this process, or on CPU its peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def batch_voxels(batch: dict) -> int:
    """Voxels of every image-like (5-D) tensor in a batch: views and neighbours count."""
    return sum(v.numel() for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim == 5)


def batch_size(batch: dict) -> int:
    return len(batch["image"])


class Throughput:
    """Samples and voxels per second between two logged steps (all ranks together)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0
        self.voxels = 0

    def add(self, batch: dict, world: int) -> None:
        self.samples += batch_size(batch) * world
        self.voxels += batch_voxels(batch) * world

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = {"samples_per_s": self.samples / elapsed, "voxels_per_s": self.voxels / elapsed}
        self.__init__()
        return rates


class RunLogger:
    """Rank 0 only. On resume, lines beyond the resumed step are dropped so the file reads as one run."""

    def __init__(self, run_dir: Path, resumed_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        keep_until(self.path, resumed_step)
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resumed_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(tb_name(key), value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def tb_name(key: str) -> str:
    if key == "loss" or key.startswith("loss_"):
        return f"loss/{key}"
    if key in ("samples_per_s", "voxels_per_s"):
        return f"throughput/{key}"
    return f"train/{key}"


def keep_until(path: Path, step: int) -> None:
    """Drop lines logged after `step` (by an interrupted run that is now being resumed)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) != len(lines):
        part = path.with_name(path.name + ".part")
        part.write_text("".join(line + "\n" for line in kept))
        part.replace(path)


def logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a killed process counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")

"""Progress for people and for log files: tqdm's bar on a terminal, plain lines everywhere else.

A bar redraws itself with carriage returns many times a second; in a SLURM log, a `nohup` file or a
`deepspeed` launcher log every redraw is kept, and the file fills with them. When stderr is not a
terminal, progress is one plain line every SSLMED_PROGRESS_SECONDS seconds (default 30) and at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

INTERVAL_ENV = "SSLMED_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 30.0


def progress(total: int, *, desc: str, unit: str = "it", initial: int = 0, disable: bool = False) -> Any:
    """A tqdm bar when stderr is a terminal, else a `PlainProgress` with the same interface."""
    if disable or sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                    file=sys.stderr)
    return PlainProgress(total, desc=desc, unit=unit, initial=initial, interval=interval_s())


def interval_s() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        value = DEFAULT_INTERVAL_S
    return max(value, 0.0)


class PlainProgress:
    """`update`, `set_postfix`, `close` as tqdm has them, printed as `desc: n/total unit (rate, elapsed)`."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int, interval: float,
                 file: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self.first = self.shown = initial
        self.file = file or sys.stderr
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.show(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n != self.shown:
            self.show(time.monotonic())

    def show(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.n - self.first) / elapsed if elapsed > 0 else 0.0
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.3g} {self.unit}/s, {elapsed:.0f} s"
              f"{extra})", file=self.file, flush=True)
        self.last, self.shown = now, self.n

"""One writer per directory: `sslmed pack --out DIR` and `sslmed pretrain run.dir=DIR` hold DIR/.sslmed.lock.

The lock is a POSIX record lock (`fcntl.lockf`) on that file, which the kernel drops when the holder
exits however it exits (kill -9 included) and which NFS carries between hosts; the file itself only
names the holder (host, pid, command, start time) for the message a second writer gets. A lock file
whose lock nobody holds is stale — its writer died — and is taken over with a note saying whose it was.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from sslmed.errors import SslmedError

LOCK_FILE = ".sslmed.lock"
F = TypeVar("F", bound=Callable[..., Any])
_HELD: set[str] = set()  # POSIX locks are per process: a second lock in this process must be refused here


class BusyError(SslmedError):
    """Another process is writing the same directory."""


class DirectoryLock:
    """`with DirectoryLock(dir, "sslmed pack"):` — exclusive, non-blocking; BusyError names the holder."""

    def __init__(self, directory: str | Path, command: str, what: str = "the output directory") -> None:
        self.directory, self.command, self.what = Path(directory), command, what
        self.path = self.directory / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in _HELD:
            raise BusyError(f"{self.directory} is in use by this process already")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or exc
            raise SslmedError(f"cannot create {self.what} {self.directory} ({reason})") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            reason = exc.strerror or exc
            raise SslmedError(f"{self.what} {self.directory} is not writable ({reason})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = describe(read_holder(fd))
            os.close(fd)
            raise BusyError(f"{self.directory} is in use by {holder}; wait for it to finish or use "
                            f"another directory (if that process is gone, delete {self.path})") from None
        previous = read_holder(fd)
        if previous:
            print(f"sslmed: note: taking over the stale lock of {describe(previous)} on {self.directory} "
                  "(that process no longer holds it)", file=sys.stderr)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command, "since": now}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        _HELD.add(key)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.discard(os.path.realpath(self.path))
        os.ftruncate(fd, 0)  # an empty file is no-one's: the next writer has nothing stale to report
        os.close(fd)  # closing drops the record lock

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (holder unknown)"
    return (f"{holder.get('command', 'sslmed')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')})")

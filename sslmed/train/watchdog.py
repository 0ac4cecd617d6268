"""A lost node never hangs the job: ranks heartbeat through the launcher's store and stop when a peer
falls silent.

A peer whose process dies (kill -9, out of memory) resets its TCP connections, and the collective the
others are in fails within seconds. A peer whose *host* vanishes (power loss, kernel panic, a cut cable)
resets nothing: the others would wait in their collective until the process-group timeout (30 minutes)
or, where a connection is half-open, for ever. So every rank runs a daemon thread that, every
`interval` seconds, bumps its own counter in the rendezvous store (the TCPStore at MASTER_ADDR:
MASTER_PORT that torchrun's agent, the DeepSpeed launcher's rank 0 or srun's rank 0 serves) and reads
the counters of its two ring neighbours (rank - 1 and rank + 1), so the store sees O(ranks) traffic.
A neighbour whose counter has not moved for `train.peer_timeout` seconds, or a store that has not
answered for that long, is a lost peer: the rank prints one line naming it and the step, and exits with
status 3. Its own connections close as it exits, so the rest of the job fails fast the same way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

from sslmed.config import Config

EXIT_PEER_LOST = 3
MAX_INTERVAL = 5.0  # seconds between heartbeats; shorter when train.peer_timeout is short

_step_in_progress = 0


def note_step(step: int) -> None:
    """The loop tells which optimizer step it is working on, for the message about a lost peer."""
    global _step_in_progress
    _step_in_progress = step


def heartbeat_interval(timeout: float) -> float:
    return min(MAX_INTERVAL, timeout / 6)


def ring_neighbours(rank: int, world: int) -> list[int]:
    return sorted({(rank - 1) % world, (rank + 1) % world} - {rank})


class Heartbeat:
    """The daemon thread described in the module docstring; `stop()` ends it after a normal finish."""

    def __init__(self, store: dist.Store, rank: int, world: int, timeout: float, store_addr: str):
        self.store, self.rank, self.timeout = store, rank, timeout
        self.interval = heartbeat_interval(timeout)
        self.store_addr = store_addr
        self.peers = ring_neighbours(rank, world)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sslmed-heartbeat", daemon=True)

    def start(self) -> None:
        self.store.set(f"host/{self.rank}", socket.gethostname())
        self.store.add(f"beat/{self.rank}", 1)
        self._thread.start()

    def stop(self, finished: bool) -> None:
        """A rank that finished says so, so that its neighbours do not mistake its silence for a loss
        (one that failed stays silent: its neighbours stop too)."""
        self._stopped.set()
        if finished:
            with contextlib.suppress(Exception):
                self.store.set(f"done/{self.rank}", "1")
        self._thread.join()

    def _run(self) -> None:
        last_seen = {peer: (-1, time.monotonic()) for peer in self.peers}
        store_answered = time.monotonic()
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            try:
                self.store.add(f"beat/{self.rank}", 1)
                beats = {peer: self._beats_of(peer) for peer in self.peers}
                done = {peer for peer in self.peers if self.store.check([f"done/{peer}"])}
            except Exception:  # the store's host is unreachable: a timeout, a reset, a refusal
                if now - store_answered >= self.timeout and not self._stopped.is_set():
                    self._lost(f"the rendezvous store at {self.store_addr}", now - store_answered)
                continue
            store_answered = now
            for peer, count in beats.items():
                previous, since = last_seen[peer]
                if count != previous:
                    last_seen[peer] = (count, now)
                elif now - since >= self.timeout and peer not in done and not self._stopped.is_set():
                    self._lost(f"rank {peer} (host {self._host_of(peer)})", now - since)

    def _beats_of(self, peer: int) -> int:
        key = f"beat/{peer}"
        return int(self.store.get(key)) if self.store.check([key]) else 0

    def _host_of(self, peer: int) -> str:
        with contextlib.suppress(Exception):
            return self.store.get(f"host/{peer}").decode()
        return "unknown"

    def _lost(self, who: str, silence: float) -> None:
        # The main thread may be blocked inside a collective that will never return: leave from here.
        print(f"sslmed: error: lost {who} during step {_step_in_progress}: no heartbeat for "
              f"{silence:.0f} s (train.peer_timeout={self.timeout:g}); stopping this rank, relaunch to "
              "resume from the last checkpoint", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)


def start_heartbeat(timeout: float) -> Heartbeat | None:
    """A heartbeat for a rank of a launched job (RANK, WORLD_SIZE, MASTER_ADDR/PORT set by the
    launcher); none for a single process or when `timeout` is 0."""
    if timeout <= 0 or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # a client connection of its own, with a short timeout, so that a dead store never blocks it long
    wait = timedelta(seconds=heartbeat_interval(timeout))
    client = dist.TCPStore(host, port, is_master=False, timeout=wait, wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts start afresh
    store = dist.PrefixStore(f"sslmed/heartbeat/{attempt}/", client)
    beat = Heartbeat(store, dist.get_rank(), dist.get_world_size(), timeout, f"{host}:{port}")
    beat.start()
    return beat


@contextlib.contextmanager
def watch_peers(cfg: Config) -> Iterator[None]:
    """Run a pretraining with every rank watching its neighbours (see the module docstring)."""
    from sslmed.train import engine as eng

    eng.init_distributed()
    beat = start_heartbeat(cfg.train.peer_timeout)
    finished = False
    try:
        yield
        finished = True
    except dist.DistError:
        if beat is None:
            raise
        # A peer's connection broke under a collective. If the peer is gone, its heartbeat stops and
        # the thread names it and ends the process; otherwise this was some other failure.
        time.sleep(beat.timeout + 2 * beat.interval)
        raise
    finally:
        if beat is not None:
            beat.stop(finished)

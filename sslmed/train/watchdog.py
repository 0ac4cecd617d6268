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
    """Two daemon threads: one talks to the store (and may block there, when the store's host is
    gone), the other only compares clocks, so that a blocked store call never delays the verdict."""

    def __init__(self, store: dist.Store, rank: int, world: int, timeout: float, store_addr: str):
        self.store, self.rank, self.timeout = store, rank, timeout
        self.interval = heartbeat_interval(timeout)
        self.store_addr = store_addr
        self.peers = ring_neighbours(rank, world)
        now = time.monotonic()
        self._beats = dict.fromkeys(self.peers, 0)  # the neighbours' counters as last read
        self._heard = dict.fromkeys(self.peers, now)  # when each counter last moved
        self._hosts = dict.fromkeys(self.peers, "unknown")
        self._done: set[int] = set()  # neighbours that finished normally
        self._store_answered = now
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=target, name=f"sslmed-{name}", daemon=True)
                         for name, target in (("heartbeat", self._beat), ("peer-judge", self._judge))]

    def start(self) -> None:
        self.store.set(f"host/{self.rank}", socket.gethostname())
        self.store.add(f"beat/{self.rank}", 1)
        for thread in self._threads:
            thread.start()

    def stop(self, finished: bool) -> None:
        """A rank that finished says so, so that its neighbours do not mistake its silence for a loss
        (one that failed stays silent: its neighbours stop too)."""
        self._stopped.set()
        if finished:
            with contextlib.suppress(Exception):
                self.store.set(f"done/{self.rank}", "1")
        # Let a store call in flight return before the interpreter exits (a thread inside C++ at exit
        # aborts the process); a store that no longer answers is not waited for beyond its timeout.
        for thread in self._threads:
            thread.join(timeout=2 * self.interval)

    def peers_alive(self) -> bool:
        """After a collective failed: True once every neighbour has beaten twice more (the failure was
        not a lost peer); a lost one never does, and the judge ends the process within the timeout."""
        start = dict(self._beats)
        deadline = time.monotonic() + self.timeout + 3 * self.interval
        while time.monotonic() < deadline:
            if all(self._beats[peer] >= start[peer] + 2 for peer in self.peers):
                return True
            time.sleep(self.interval / 4)
        return False

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval):
            with contextlib.suppress(Exception):  # an unreachable store: the judge counts its silence
                self.store.add(f"beat/{self.rank}", 1)
                for peer in self.peers:
                    self._read_peer(peer)
                self._store_answered = time.monotonic()

    def _read_peer(self, peer: int) -> None:
        if not self.store.check([f"beat/{peer}"]):
            return  # not started yet
        count = int(self.store.get(f"beat/{peer}"))
        if count != self._beats[peer]:
            if self._hosts[peer] == "unknown":
                self._hosts[peer] = self.store.get(f"host/{peer}").decode()
            self._beats[peer], self._heard[peer] = count, time.monotonic()
        if self.store.check([f"done/{peer}"]):
            self._done.add(peer)

    def _judge(self) -> None:
        while not self._stopped.wait(self.interval / 2):
            now = time.monotonic()
            if now - self._store_answered >= self.timeout:
                self._lost(f"the rendezvous store at {self.store_addr}", now - self._store_answered)
            for peer in self.peers:
                if now - self._heard[peer] >= self.timeout and peer not in self._done:
                    self._lost(f"rank {peer} (host {self._hosts[peer]})", now - self._heard[peer])

    def _lost(self, who: str, silence: float) -> None:
        if self._stopped.is_set():
            return
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
    except RuntimeError:  # what gloo raises when a peer's connection breaks under a collective
        # If the peer is gone, its heartbeat stops and the thread names it and ends the process;
        # if every neighbour still beats, this was some other failure, reported as it is.
        if beat is not None:
            beat.peers_alive()
        raise
    finally:
        if beat is not None:
            beat.stop(finished)

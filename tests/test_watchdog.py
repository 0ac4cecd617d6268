"""The heartbeat that stops a rank whose peer is lost, on an in-process store (no launches)."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from sslmed.train import engine as eng
from sslmed.train import watchdog

TIMEOUT = 1.2  # train.peer_timeout for these tests; heartbeats every TIMEOUT / 6 s


@pytest.fixture
def verdicts(monkeypatch):
    """What `_lost` would print before ending the process, recorded instead."""
    seen: list[tuple[int, str]] = []

    def record(self, who: str, silence: float) -> None:
        if not self._stopped.is_set():
            seen.append((self.rank, who))
            self._stopped.set()

    monkeypatch.setattr(watchdog.Heartbeat, "_lost", record)
    return seen


def store_server() -> tuple[dist.TCPStore, int]:
    port = eng.free_port()
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False), port


def beat(port: int, rank: int, world: int) -> watchdog.Heartbeat:
    client = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                           timeout=timedelta(seconds=watchdog.heartbeat_interval(TIMEOUT)))
    heart = watchdog.Heartbeat(dist.PrefixStore("t/", client), rank, world, TIMEOUT, f"127.0.0.1:{port}")
    heart.start()
    return heart


def wait_until(condition, seconds: float) -> float:
    start = time.monotonic()
    while not condition() and time.monotonic() - start < seconds:
        time.sleep(0.02)
    return time.monotonic() - start


def test_each_rank_watches_its_ring_neighbours():
    assert watchdog.ring_neighbours(0, 2) == [1]
    assert watchdog.ring_neighbours(0, 5) == [1, 4]
    assert watchdog.ring_neighbours(3, 5) == [2, 4]


def test_a_silent_peer_is_named_within_the_timeout(verdicts):
    server, port = store_server()
    hearts = [beat(port, rank, 3) for rank in range(3)]
    watchdog.note_step(7)
    time.sleep(2 * TIMEOUT)
    assert verdicts == []  # all beating: nobody is lost, however long it runs
    hearts[2].stop(finished=False)  # rank 2 falls silent (as a vanished host does)
    waited = wait_until(lambda: len(verdicts) == 2, 3 * TIMEOUT)
    assert sorted(rank for rank, _ in verdicts) == [0, 1]  # rank 2's two neighbours
    assert all(who == f"rank 2 (host {socket.gethostname()})" for _, who in verdicts)
    # silence counts from the last beat read, up to two intervals (a beat and a read) before the stop
    interval = hearts[0].interval
    assert TIMEOUT - 2 * interval <= waited <= TIMEOUT + 2 * interval + 0.5
    for heart in hearts:
        heart.stop(finished=True)
    del server


def test_a_peer_that_finished_is_not_lost(verdicts):
    server, port = store_server()
    hearts = [beat(port, rank, 2) for rank in range(2)]
    time.sleep(TIMEOUT / 2)
    hearts[1].stop(finished=True)
    time.sleep(2 * TIMEOUT)
    assert verdicts == []
    hearts[0].stop(finished=True)
    del server


def test_an_unreachable_store_is_a_lost_peer(verdicts):
    server, port = store_server()
    heart = beat(port, 0, 2)
    del server  # the store's host is gone
    assert wait_until(lambda: bool(verdicts), 3 * TIMEOUT) <= 3 * TIMEOUT
    assert verdicts[0][1] == f"the rendezvous store at 127.0.0.1:{port}"
    heart.stop(finished=False)


def test_the_message_names_peer_step_and_setting(capsys, monkeypatch):
    exits = []
    monkeypatch.setattr(watchdog.os, "_exit", exits.append)
    heart = watchdog.Heartbeat(dist.HashStore(), 0, 2, 60.0, "node-001:29500")
    watchdog.note_step(12)
    heart._lost("rank 1 (host node-002)", 61.2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and exits == [watchdog.EXIT_PEER_LOST]
    assert err.startswith("sslmed: error: lost rank 1 (host node-002) during step 12: no heartbeat for 61 s")
    assert "train.peer_timeout=60" in err

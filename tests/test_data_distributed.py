"""Two gloo ranks: disjoint samples that cover the set per epoch; more streams than shards never hangs."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslmed.config import Config
from sslmed.data.pipeline import build_loader
from sslmed.io.pack import pack
from sslmed.io.synthetic import write_phantoms

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world: int, port: int, scenarios: list[dict], out: str) -> None:
    """Each scenario: a loader on `path` with `workers` workers, `steps` batches, an all-reduce per step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for scenario in scenarios:
        cfg = Config()
        cfg.data.path, cfg.data.crop_size, cfg.data.augment = scenario["path"], 8, False
        cfg.data.workers, cfg.data.crops_per_volume, cfg.data.shuffle_buffer = scenario["workers"], 1, 1
        cfg.train.micro_batch = 1
        loader = build_loader(cfg, rank, world)
        keys, epochs = [], []
        for _ in range(scenario["steps"]):
            batch = next(loader)
            total = torch.ones(1)
            dist.all_reduce(total)  # a collective every step, as training does: must never hang
            keys.append(batch["key"][0])
            epochs.append(loader.epoch)
        loader.close()
        results.append({"keys": keys, "epochs": epochs})
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def spawn(world: int, scenarios: list[dict], out: Path, timeout: float = 240.0) -> list[list[dict]]:
    context = mp.spawn(run_rank, args=(world, free_port(), scenarios, str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks still running after {timeout:.0f} s: the loader hangs")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_two_ranks_split_the_set_and_never_hang(tmp_path):
    phantoms = write_phantoms(tmp_path / "in", 6, shape=(12, 12, 12), seed=5)
    names = [p.name.split(".")[0] for p in phantoms]
    pack(phantoms, tmp_path / "six", fmt="wds", shard_size=1)  # 6 shards of one volume
    pack(phantoms[:2], tmp_path / "two", fmt="wds", shard_size=1)  # 2 shards for 2 ranks × 2 workers
    ranks = spawn(2, [{"path": str(tmp_path / "six"), "workers": 0, "steps": 3},
                      {"path": str(tmp_path / "two"), "workers": 2, "steps": 6}], out=tmp_path)

    first, second = (set(r[0]["keys"]) for r in ranks)
    assert len(first) == len(second) == 3 and not first & second
    assert first | second == set(names)
    assert all(e == 0 for r in ranks for e in r[0]["epochs"])

    for r in ranks:  # fewer shards than streams: every rank still produces every batch
        assert len(r[1]["keys"]) == 6 and set(r[1]["keys"]) <= set(names[:2])

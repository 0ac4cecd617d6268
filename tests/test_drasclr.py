"""DrasCLR as its authors built it: conditional convolutions everywhere, per-location MoCo queues, the
local and neighbour InfoNCE terms, the queues through checkpoints and across ranks.

Batches follow the atlas-grid contract (docs/architecture.md): one grid point per batch, `grid_point` a
host list, `image`/`image2` two views, `neighbour`/`neighbour2` the two nearest grid points."""

from __future__ import annotations

import copy
import json
import math
import shutil
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sslmed.config import load_config
from sslmed.errors import ConfigError
from sslmed.methods import build_method
from sslmed.methods.drasclr import DrasCLR, KeyQueues
from sslmed.models import rebuild_backbone
from sslmed.models.condcnn3d import CondCNN3D, CondConv3d
from sslmed.train import checkpoint as ckpt
from sslmed.train.loop import run_pretraining

CROP, BATCH, POINTS = 16, 4, 3


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def drasclr_config(*extra: str):
    return load_config(None, [*DrasCLR.needs.overrides(), "method.name=drasclr", "model.size=tiny",
                              "model.dim=2", "model.depth=1", "model.experts=3", f"data.crop_size={CROP}",
                              f"train.micro_batch={BATCH}", f"method.locations={POINTS}",
                              "method.queue_size=6", "method.hidden_dim=8", "method.proj_dim=5", *extra])


def grid_batch(point: int, seed: int, batch: int = BATCH, size: int = CROP) -> dict:
    """A batch as the atlas-grid stream makes it: every crop at grid point `point`."""
    gen = torch.Generator().manual_seed(seed)

    def volume() -> torch.Tensor:
        return torch.randn(batch, 1, size, size, size, generator=gen)

    def at(where: torch.Tensor) -> torch.Tensor:
        return where.expand(batch, 3).clone()

    here = torch.rand(1, 3, generator=gen) * 2 - 1
    return {"image": volume(), "image2": volume(), "location": at(here), "grid_point": [point] * batch,
            "neighbour": volume(), "neighbour_location": at(torch.rand(1, 3, generator=gen) * 2 - 1),
            "neighbour2": volume(), "neighbour2_location": at(torch.rand(1, 3, generator=gen) * 2 - 1),
            "key": [f"subject-{i}" for i in range(batch)], "tags": [{} for _ in range(batch)]}


# ---- the encoder ----------------------------------------------------------------------------------


def test_conditional_conv_is_a_per_sample_convolution_with_the_location_mixed_kernel() -> None:
    torch.manual_seed(0)
    conv = CondConv3d(3, 4, stride=2, experts=5).double()
    x, where = torch.randn(3, 3, 7, 6, 5, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64) * 2 - 1
    out = conv(x, where)
    for b in range(3):
        routing = torch.sigmoid(where[b] @ conv.route.weight.T + conv.route.bias)  # (E,)
        kernel = sum(routing[e] * conv.weight[e] for e in range(5))
        expected = F.conv3d(x[b:b + 1], kernel, conv.bias, stride=2, padding=1)
        assert torch.allclose(out[b:b + 1], expected, atol=1e-12)


def test_every_convolution_is_conditional_with_the_papers_channels() -> None:
    net = CondCNN3D(size="base")
    assert not [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    convs = net.conditional_convs()
    assert all(c.experts == 8 for c in convs)
    # the authors' Encoder (models/cnn3d.py) conv by conv: (in, out, stride)
    authors = [(1, 8, 1), (8, 8, 2), (8, 16, 1), (16, 16, 1), (16, 16, 2), (16, 32, 1), (32, 32, 1),
               (32, 32, 2), (32, 64, 1), (64, 64, 1), (64, 64, 2), (64, 128, 1), (128, 128, 2)]
    assert [(c.weight.shape[2], c.weight.shape[1], c.stride) for c in convs] == authors
    assert net.feature_dim == 128
    maps = net.forward_features(torch.randn(2, 1, 32, 32, 32), torch.zeros(2, 3))
    assert maps[-1].shape == (2, 128, 1, 1, 1)  # a 32³ patch ends as one 128-channel cell
    assert all(isinstance(m, torch.nn.BatchNorm3d) for s in net.stages for u in s.units for m in [u.norm])
    assert all(isinstance(u.act, torch.nn.ELU) for s in net.stages for u in s.units)


def test_features_depend_on_the_location_per_sample_and_a_missing_location_is_refused() -> None:
    torch.manual_seed(1)
    net = CondCNN3D(dim=2, depth=1, experts=3).eval()
    x = torch.randn(2, 1, CROP, CROP, CROP)
    a = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[-1.0, -1.0, -1.0], [0.2, -0.9, 0.4]])
    fa, fb = net(x, a), net(x, b)
    assert torch.equal(fa[0], fb[0])  # sample 0's kernels do not depend on sample 1's location
    assert (fa[1] - fb[1]).norm() > 1e-3 * fa[1].norm()
    with pytest.raises(ValueError, match="location-conditioned"):
        net(x)
    clone = rebuild_backbone(net.export_config()).eval()
    clone.load_state_dict(net.state_dict())
    assert torch.equal(clone(x, a), fa) and CondCNN3D.location_conditioned


# ---- the queues -----------------------------------------------------------------------------------


def test_queue_per_location_enqueues_in_order_wraps_around_and_leaves_other_locations() -> None:
    torch.manual_seed(2)
    queues = KeyQueues(locations=3, size=5, dim=2)
    start = queues.keys.clone()
    first, second = torch.randn(3, 2), torch.randn(4, 2)
    queues.enqueue(first, torch.tensor([1]))
    assert torch.equal(queues.keys[1, :3], first) and torch.equal(queues.keys[1, 3:], start[1, 3:])
    queues.enqueue(second, torch.tensor([1]))  # slots 3, 4, then around to 0, 1: the oldest first
    assert torch.equal(queues.keys[1], torch.stack([second[2], second[3], first[2], second[0], second[1]]))
    assert queues.pointer.tolist() == [0, 2, 0]
    assert torch.equal(queues.keys[0], start[0]) and torch.equal(queues.keys[2], start[2])
    assert torch.allclose(start.norm(dim=2), torch.ones(3, 5))  # MoCo's random unit keys to begin with
    # a batch padded to 4 rows with 2 real keys: only those 2 are written, the pointer moves by 2
    held = queues.keys.clone()
    queues.enqueue(torch.cat([first[:2], torch.zeros(2, 2)]), torch.tensor([2]), torch.tensor([2]))
    assert torch.equal(queues.keys[2, :2], first[:2]) and torch.equal(queues.keys[2, 2:], held[2, 2:])
    assert queues.pointer.tolist() == [0, 2, 2] and torch.equal(queues.keys[:2], held[:2])


def reference_losses(method: DrasCLR, batch: dict, negatives: torch.Tensor) -> tuple[float, float]:
    """The two InfoNCE terms in float64, from float64 copies of the query and key encoders, written out
    as the authors' logits: l_pos = q·k, l_neg = q·queue; neighbour: Σ_r r·k and Σ_r r·queue."""
    query = copy.deepcopy(method.online()).double()
    key = copy.deepcopy(method.key_encoder.module).double()
    t = method.settings.temperature

    def embed(net, x, where):
        return F.normalize(net["projector"](net["backbone"](x.double(), where.double())), dim=1)

    with torch.no_grad():
        q, k = embed(query, batch["image"], batch["location"]), embed(key, batch["image2"], batch["location"])
        pairs = embed(query, torch.cat([batch["neighbour"], batch["neighbour2"]]),
                      torch.cat([batch["neighbour_location"], batch["neighbour2_location"]]))
    r = [pairs[:BATCH], pairs[BATCH:]]
    queue = negatives.double()

    def nll(pos: list[float], negs: list[list[float]]) -> float:
        rows = [-(p / t) + math.log(math.exp(p / t) + sum(math.exp(n / t) for n in ns))
                for p, ns in zip(pos, negs, strict=True)]
        return sum(rows) / len(rows)

    local = nll([float(q[i] @ k[i]) for i in range(BATCH)],
                [[float(q[i] @ queue[j]) for j in range(len(queue))] for i in range(BATCH)])
    neighbour = nll([sum(float(rr[i] @ k[i]) for rr in r) for i in range(BATCH)],
                    [[sum(float(rr[i] @ queue[j]) for rr in r) for j in range(len(queue))]
                     for i in range(BATCH)])
    return local, neighbour


def test_infonce_terms_match_a_float64_reference_with_that_locations_queue_as_negatives() -> None:
    torch.manual_seed(3)
    method = build_method(drasclr_config("method.neighbour_weight=0.5"))
    batch = grid_batch(point=2, seed=0)
    negatives = method.queues.keys[2].clone()
    before = method.queues.keys.clone()
    local, neighbour = reference_losses(method, batch, negatives)
    loss, logs = method(batch)
    assert logs["loss_local"].item() == pytest.approx(local, rel=1e-5)
    assert logs["loss_neighbour"].item() == pytest.approx(neighbour, rel=1e-5)
    assert loss.item() == pytest.approx(local + 0.5 * neighbour, rel=1e-5)
    # then the batch's keys (the key encoder's second views) went into point 2's queue only
    with method.key_encoder.applied_to(batch["image2"]) as key:
        k = F.normalize(key["projector"](key["backbone"](batch["image2"], batch["location"])), dim=1)
    assert torch.allclose(method.queues.keys[2, :BATCH], k, atol=1e-6)
    assert torch.equal(method.queues.keys[2, BATCH:], before[2, BATCH:])
    assert torch.equal(method.queues.keys[:2], before[:2]) and method.queues.pointer.tolist() == [0, 0, 4]
    # gradients reach the query encoder through both terms, never the key encoder
    loss.backward()
    assert all(p.grad is not None for p in method.backbone.parameters())
    assert all(p.grad is None for p in method.key_encoder.module.parameters())
    # a grid batch without some subjects (the point lies outside their volumes) enqueues what it has
    method(grid_batch(point=0, seed=5, batch=BATCH - 1))
    assert method.queues.pointer.tolist() == [BATCH - 1, 0, BATCH]


def test_a_step_waits_for_nothing_on_the_host(monkeypatch) -> None:
    method = build_method(drasclr_config())
    batch = grid_batch(point=1, seed=1)
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _o=original, **k: calls.append(_n) or _o(self, *a, **k))
    loss, _ = method(batch)
    loss.backward()
    method.on_step_end(1, 10)
    monkeypatch.undo()
    assert calls == []


# ---- through the training loop: checkpoints keep the queues bit for bit -----------------------------


class GridLoader:
    """The atlas-grid stream's interface: deterministic in (seed, rank, position), resumable, one grid
    point per batch (cycling through the points)."""

    def __init__(self, cfg, rank: int, world: int) -> None:
        self.cfg, self.rank, self.position, self.epoch = cfg, rank, 0, 0

    def __iter__(self):
        while True:
            seed = self.cfg.train.seed * 100003 + self.rank * 1009 + self.position
            batch = grid_batch(self.position % POINTS, seed)
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_restores_queues_pointers_and_key_encoder_bit_for_bit(tmp_path) -> None:
    """Kill-and-resume as the loop sees it: the newest checkpoint lost, the run resumes from step 2 and
    must redo steps 3-4 with the same losses and end with the same queues (wrapped around by then)."""
    cfg = drasclr_config(f"run.dir={tmp_path}", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5",
                         "optim.warmup_steps=1", "optim.lr=0.01", "optim.optimizer=sgd")  # the paper's
    run_pretraining(cfg, build_method, GridLoader)
    reference = losses(tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "step_4" / ckpt.TEACHERS, weights_only=True)
    assert saved["held.queue.keys"].dtype == torch.float32
    assert saved["held.queue.pointer"].tolist() == [(2 * BATCH) % 6, BATCH, BATCH]  # points 0,1,2,0
    shutil.rmtree(tmp_path / "checkpoints" / "step_4")
    run_pretraining(cfg, build_method, GridLoader)
    assert losses(tmp_path) == reference  # fp32 on CPU: bit for bit
    resumed = torch.load(tmp_path / "checkpoints" / "step_4" / ckpt.TEACHERS, weights_only=True)
    assert resumed.keys() == saved.keys()
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)
    assert not torch.equal(saved["held.queue.keys"], build_method(cfg).queues.keys)  # it did change
    # the loop refuses another method configuration first; queues of another shape are refused as well
    other = build_method(drasclr_config("method.queue_size=8"))
    with pytest.raises(ckpt.CheckpointError, match="key queues of shape"):
        ckpt.restore_outside_state(other, ckpt.read_checkpoint(tmp_path / "checkpoints" / "step_4"))


def test_sgd_with_momentum_is_the_papers_optimizer() -> None:
    from sslmed.train.engine import build_optimizer

    cfg = drasclr_config("optim.optimizer=sgd", "optim.lr=0.01", "optim.momentum=0.9",
                         "optim.weight_decay=1e-4")
    method = build_method(cfg)
    opt = build_optimizer(method, cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert {(g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups} == {(0.01, 0.9, 1e-4),
                                                                                        (0.01, 0.9, 0.0)}
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in method.parameters()}  # the key encoder is no parameter of the method
    with pytest.raises(ConfigError, match="optim.momentum must be in"):
        drasclr_config("optim.momentum=1.0")


# ---- keys gathered across two ranks before enqueueing ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# per scenario, each rank's grid point and number of crops (a grid batch misses subjects that lack the point)
SCENARIOS = [([1, 1], [BATCH, BATCH]), ([2, 0], [BATCH, BATCH - 1]), ([0, 0], [BATCH - 2, BATCH])]


def _enqueue_worker(rank: int, world: int, port: int, keys: torch.Tensor, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for i, (points, counts) in enumerate(SCENARIOS):
            torch.manual_seed(0)
            method = build_method(drasclr_config())
            method.enqueue(keys[rank * BATCH:rank * BATCH + counts[rank]], points[rank])
            out[rank, i] = (method.queues.keys.clone(), method.queues.pointer.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_ranks_keys_reach_every_ranks_queue_of_their_grid_point() -> None:
    world = 2
    keys = F.normalize(torch.randn(world * BATCH, 5, generator=torch.Generator().manual_seed(4)), dim=1)
    with mp.Manager() as manager:
        out = manager.dict()
        # spawn, not fork: a forked child would inherit a process group joined by earlier tests
        mp.start_processes(_enqueue_worker, args=(world, free_port(), keys, out), nprocs=world, join=True,
                           start_method="spawn")
        results = dict(out)
    for i, (points, counts) in enumerate(SCENARIOS):
        torch.manual_seed(0)
        expected = build_method(drasclr_config()).queues  # the same initial queues; rank 0's keys first
        for rank in range(world):
            expected.enqueue(keys[rank * BATCH:rank * BATCH + counts[rank]], torch.tensor([points[rank]]))
        for rank in range(world):
            queue, pointer = results[rank, i]
            assert torch.equal(queue, expected.keys) and torch.equal(pointer, expected.pointer), (i, rank)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

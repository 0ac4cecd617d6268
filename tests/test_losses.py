"""Losses against independent references; the cross-rank gather against a single-process run."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslmed.methods.losses import (
    gather_with_grad,
    masked_mse,
    negative_cosine,
    nt_xent,
    patchify,
    random_masking,
    unpatchify,
)

torch.set_num_threads(1)


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's formula written out anchor by anchor, in float64."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2

    def sim(i: int, j: int) -> torch.Tensor:
        return (z[i] @ z[j]) / (z[i].norm() * z[j].norm()) / temperature

    total = torch.zeros((), dtype=torch.float64)
    for i in range(n2):
        positive = (i + n) % n2
        denominator = sum(torch.exp(sim(i, k)) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim(i, positive)) / denominator)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_loop_reference_values_and_gradients(temperature: float) -> None:
    torch.manual_seed(0)
    z1 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    ours = nt_xent(z1, z2, temperature)
    grads = torch.autograd.grad(ours, (z1, z2))
    ref = nt_xent_reference(z1, z2, temperature)
    ref_grads = torch.autograd.grad(ref, (z1, z2))
    assert torch.allclose(ours, ref, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-10)


def test_nt_xent_float32_close_to_reference_and_rejects_bad_shapes() -> None:
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    assert math.isclose(nt_xent(z1, z2, 0.2).item(), nt_xent_reference(z1, z2, 0.2).item(), rel_tol=1e-5)
    with pytest.raises(ValueError):
        nt_xent(z1, z2[:4], 0.2)


def test_negative_cosine_matches_reference_and_stops_gradient_into_target() -> None:
    torch.manual_seed(2)
    p = torch.randn(6, 9, requires_grad=True)
    z = torch.randn(6, 9, requires_grad=True)
    loss = negative_cosine(p, z)
    pd, zd = p.detach(), z.detach()
    ref = -sum(float(pd[i] @ zd[i] / (pd[i].norm() * zd[i].norm())) for i in range(6)) / 6
    assert math.isclose(loss.item(), ref, rel_tol=1e-5)
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_masked_mse_counts_only_masked_patches() -> None:
    torch.manual_seed(3)
    pred, target = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    mask = torch.zeros(2, 10)
    mask[0, [1, 4]] = 1
    mask[1, [0, 2, 9]] = 1
    loss = masked_mse(pred, target, mask)
    expected = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    assert torch.allclose(loss, expected)
    changed = pred.clone()
    changed[~mask.bool()] += 100.0  # visible patches
    assert torch.equal(masked_mse(changed, target, mask), loss)
    changed[0, 1] += 1.0  # a masked one
    assert not torch.equal(masked_mse(changed, target, mask), loss)


def test_patchify_follows_conv_token_order_and_inverts() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 1, 8, 12, 16)
    patches = patchify(x, 4)
    assert patches.shape == (2, 2 * 3 * 4, 64)
    # token t = (i, j, k) in D-H-W raster order holds x[..., 4i:4i+4, 4j:4j+4, 4k:4k+4]
    i, j, k = 1, 2, 3
    t = i * 12 + j * 4 + k
    assert torch.equal(patches[1, t], x[1, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4, 4 * k:4 * k + 4].flatten())
    assert torch.equal(unpatchify(patches, 4, (2, 3, 4)), x)


def test_random_masking_exact_count_distinct_and_reproducible() -> None:
    tokens, ratio = 64, 0.75
    torch.manual_seed(5)
    ids_keep, mask, ids_restore = random_masking(4, tokens, ratio)
    assert (mask.sum(1) == round(ratio * tokens)).all()
    assert ids_keep.shape == (4, tokens - round(ratio * tokens))
    assert len({tuple(m.tolist()) for m in mask}) == 4
    # kept ids are exactly the unmasked positions
    for b in range(4):
        assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())
        assert torch.equal(torch.argsort(ids_restore[b]).sort().values, torch.arange(tokens))
    torch.manual_seed(5)
    again = random_masking(4, tokens, ratio)
    assert torch.equal(again[1], mask) and torch.equal(again[0], ids_keep)
    assert random_masking(3, 10, 0.99)[0].shape == (3, 1)  # never masks everything


# ---- two processes over gloo ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        assert gather_with_grad(a).shape == (world * n, z1.shape[1])
        loss = nt_xent(a, b, 0.3, gather=True)
        loss.backward()
        out[rank] = (loss.detach(), a.grad.clone(), b.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_nt_xent_equals_single_process_loss_and_gradients() -> None:
    torch.manual_seed(6)
    world = 2
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    with mp.Manager() as manager:
        out = manager.dict()
        # spawn, not fork: a forked child would inherit the process group that in-process training
        # in earlier test modules joined (DeepSpeed keeps it for the life of the process)
        mp.start_processes(_gather_worker, args=(world, free_port(), z1, z2, out), nprocs=world,
                           join=True, start_method="spawn")
        results = dict(out)
    full1, full2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = nt_xent(full1, full2, 0.3)
    full.backward()
    # the ranks' losses average to the full loss ...
    assert torch.allclose(sum(results[r][0] for r in range(world)) / world, full, atol=1e-12)
    # ... and each rank's input gradient, once the data-parallel average divides by `world`,
    # is the full loss's gradient for that rank's slice
    n = z1.shape[0] // world
    for r in range(world):
        assert torch.allclose(results[r][1] / world, full1.grad[r * n:(r + 1) * n], atol=1e-12)
        assert torch.allclose(results[r][2] / world, full2.grad[r * n:(r + 1) * n], atol=1e-12)


def test_gather_is_identity_without_process_group() -> None:
    t = torch.randn(3, 2)
    assert gather_with_grad(t) is t
    assert torch.allclose(nt_xent(t, t + 1, 0.1, gather=True), nt_xent(t, t + 1, 0.1))

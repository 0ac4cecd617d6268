"""Loss functions and tensor helpers shared by the methods.

`gather_with_grad` is the only place a method talks to other ranks: an all_gather whose backward
sums each rank's gradient contributions and hands every rank the slice of its own inputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)  # every rank's loss may depend on every rank's inputs
        return stacked[dist.get_rank()]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0, gradients flowing back; identity on one rank."""
    if not distributed():
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
            gather: bool = False) -> torch.Tensor:
    """SimCLR NT-Xent on cosine similarity, the mean over the 2N anchors (N local pairs).

    Anchor k's positive is the other view of the same sample; negatives are all other 2N − 2 embeddings
    (with `gather`, those of every rank: each rank then averages over its own anchors only).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    # float32 at least: a softmax over 2N similarities / temperature is too coarse in bf16
    z1, z2 = F.normalize(_at_least_fp32(z1), dim=1), F.normalize(_at_least_fp32(z2), dim=1)
    n = z1.shape[0]
    if gather and distributed():
        k1, k2 = gather_with_grad(z1), gather_with_grad(z2)
        offset = dist.get_rank() * n
    else:
        k1, k2, offset = z1, z2, 0
    total = k1.shape[0]
    anchors, keys = torch.cat([z1, z2]), torch.cat([k1, k2])
    logits = anchors @ keys.T / temperature
    own = torch.arange(n, device=z1.device) + offset
    self_index = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    logits = logits.masked_fill(F.one_hot(self_index, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(logits, positive)


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float
             ) -> torch.Tensor:
    """MoCo's InfoNCE: the mean over rows of −log softmax of the positive logit among
    [query·key, query·negatives] / temperature. query, key (B, D) and negatives (K, D), normalised by the
    caller (DrasCLR's neighbour query is a sum of unit vectors); computed in float32 at least."""
    query, key, negatives = _at_least_fp32(query), _at_least_fp32(key), _at_least_fp32(negatives)
    positive = (query * key).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, query @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean negative cosine similarity of predictions `p` to targets `z`; no gradient reaches `z`."""
    p, z = _at_least_fp32(p), _at_least_fp32(z.detach())
    return -(F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1).mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only: pred/target (B, T, P), mask (B, T) with 1 = masked."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch zero mean, unit variance (MAE's norm_pix_loss target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W) → (B, T, p³·C), patches in D-H-W raster order (as a stride-p Conv3d flattens)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """Inverse of `patchify`."""
    b = patches.shape[0]
    gd, gh, gw = grid
    x = patches.reshape(b, gd, gh, gw, p, p, p, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gd * p, gh * p, gw * p)


def random_masking(batch: int, tokens: int, ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (facebookresearch/mae), the noise drawn from
    `generator` (on `device`; None: the global RNG).

    Returns ids_keep (B, T_keep), mask (B, T) with 1 = masked in raster order, ids_restore (B, T).
    Exactly round(ratio · T) tokens are masked per sample (at least one is kept).
    """
    keep = max(1, tokens - round(ratio * tokens))
    noise = torch.rand(batch, tokens, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, tokens, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def random_grid_mask(image: torch.Tensor, patch: int, ratio: float, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-wise random mask for CNNs: visible map (B, 1, d, h, w), 1 = visible; mask (B, T), 1 = masked."""
    b = image.shape[0]
    grid = tuple(s // patch for s in image.shape[2:])
    _, mask, _ = random_masking(b, grid[0] * grid[1] * grid[2], ratio, image.device, generator)
    return (1.0 - mask).view(b, 1, *grid).to(image.dtype), mask

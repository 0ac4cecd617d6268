"""The soft target of CAE-residual self-supervision, as a pure function.

target = median_filter₅( clip( (|x − CAE(x)| − p₁) / (p₉₉ − p₁), 0, 1 ) ), with p₁ and p₉₉ the 1st and
99th percentiles of each volume's residual (numpy's linear interpolation) and a 3-D median filter whose
borders repeat the edge voxel (MONAI's `median_filter`; scipy's mode "nearest"). The result lies in
[0, 1]: a target for BCE-with-logits. Computed on the device, batched; precompute it once per unlabelled
volume (`sslmed derive residual-targets`, sslmed/derive.py) or call it on the fly.
"""

from __future__ import annotations

import torch
from monai.networks.layers import median_filter

from sslmed.errors import ConfigError


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-th percentile of (B, N) `values`, linear interpolation between order statistics (numpy's
    default). Sorting avoids `torch.quantile`'s limit of 2²⁴ elements, which whole volumes exceed."""
    ordered = values.sort(dim=1).values
    position = q / 100.0 * (values.shape[1] - 1)
    below = int(position)
    above = min(below + 1, values.shape[1] - 1)
    weight = position - below
    return ordered[:, below] * (1.0 - weight) + ordered[:, above] * weight


def residual_target(image: torch.Tensor, reconstruction: torch.Tensor, low: float = 1.0, high: float = 99.0,
                    kernel_size: int = 5, slab: int = 0) -> torch.Tensor:
    """(B, C, D, H, W) image and its CAE reconstruction → the (B, C, D, H, W) target in [0, 1]. With
    `slab` > 0 the median filter runs on slabs of that many slices along D at a time (the same result:
    each slab reads its neighbours' slices as its margin); MONAI's filter holds kernel_size³ copies of
    its input, which a whole volume cannot afford."""
    if image.shape != reconstruction.shape or image.dim() != 5:
        raise ConfigError(f"residual target: image {tuple(image.shape)} and reconstruction "
                          f"{tuple(reconstruction.shape)} must be the same (B, C, D, H, W) shape")
    if not 0 <= low < high <= 100 or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"residual target: need 0 ≤ low < high ≤ 100 and an odd kernel size, got "
                          f"low={low}, high={high}, kernel_size={kernel_size}")
    residual = (image - reconstruction).abs().float()
    per_volume = residual.flatten(1)
    lo = percentile(per_volume, low).view(-1, 1, 1, 1, 1)
    hi = percentile(per_volume, high).view(-1, 1, 1, 1, 1)
    # A volume whose residual is flat between the percentiles maps to 0 there, 1 above.
    scaled = ((residual - lo) / (hi - lo).clamp_min(torch.finfo(residual.dtype).tiny)).clamp(0.0, 1.0)
    if kernel_size == 1:
        return scaled
    depth = scaled.shape[2]
    if slab <= 0 or slab >= depth:
        return median_filter(scaled, kernel_size=kernel_size, spatial_dims=3)
    margin = kernel_size // 2
    out = torch.empty_like(scaled)
    for first in range(0, depth, slab):
        last = min(first + slab, depth)
        lo, hi = max(first - margin, 0), min(last + margin, depth)
        # at the volume's faces the filter's own edge padding applies, as it does to the whole volume
        filtered = median_filter(scaled[:, :, lo:hi], kernel_size=kernel_size, spatial_dims=3)
        out[:, :, first:last] = filtered[:, :, first - lo:last - lo]
    return out

"""Synthetic lesions for `sslmed demo anomaly`, in crops scaled to [0, 1].

Three kinds, after the anomalies of the CAE-residual paper's sinus data, each of random shape, size,
intensity, texture and opacity drawn from the caller's generator (so a seed fixes them):

* `cyst` — a smooth ellipsoid (semi-axes 3–8 voxels), homogeneous: dark like fluid or bright like
  proteinaceous content;
* `polyp` — a lobulated mass: the union of 2–4 overlapping spheres (radii 2.5–5.5), mid intensity with
  a smoothed-noise texture;
* `rim` — mucosal-thickening-like: a shell 1.5–4 voxels thick on a sphere of radius 7–12, kept on a
  random cap of it, textured.

`insert_lesion` blends the lesion into the crop inside its mask only: weight = opacity × a soft edge
that falls to zero at the mask's border, and exactly zero outside it.
"""

from __future__ import annotations

import numpy as np

LESION_KINDS = ("cyst", "polyp", "rim")
PACK_PERCENTILES = (0.5, 99.5)  # what `sslmed pack` maps to [0, 1] in an MR volume (io.preprocess)


def scale_to_unit(crop: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """The crop mapped linearly from its `low`–`high` percentiles to [0, 1] and clipped (the paper's
    per-crop scaling). At least 1 % of the voxels end at exactly 0 and 1 % at exactly 1, so that the
    0.5/99.5 percentiles `sslmed pack` rescales by are 0 and 1: packing leaves the crop as it is."""
    lo, hi = np.percentile(crop, [low, high])
    if hi <= lo:
        return np.zeros_like(crop, dtype=np.float32)
    return np.clip((crop - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def keeps_pack_scaling(crop: np.ndarray) -> bool:
    """Whether `sslmed pack`'s percentile scaling maps `crop` onto itself (its 0.5/99.5 percentiles are
    0 and 1)."""
    lo, hi = np.percentile(crop, PACK_PERCENTILES)
    return bool(lo == 0.0 and hi == 1.0)


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation: a texture."""
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape), sigma)
    return (noise / max(noise.std(), 1e-8)).astype(np.float32)


def lesion_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, size) float map: > 0 inside the lesion (rising from its border), 0 outside."""
    grid = np.indices((size,) * 3, dtype=np.float32)
    centre = rng.uniform(0.35 * size, 0.65 * size, size=3)
    if kind == "cyst":
        radii = rng.uniform(3.0, 8.0, size=3)
        level = 1.0 - np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))
    elif kind == "polyp":
        lobes = []
        for _ in range(int(rng.integers(2, 5))):
            at, radius = centre + rng.normal(0.0, 2.5, size=3), rng.uniform(2.5, 5.5)
            lobes.append(1.0 - np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, at, strict=True))) / radius)
        level = np.max(lobes, axis=0)
    elif kind == "rim":
        radius, thickness = rng.uniform(7.0, 12.0), rng.uniform(1.5, 4.0)
        offset = grid - centre.reshape(3, 1, 1, 1)
        distance = np.sqrt((offset ** 2).sum(axis=0))
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        facing = np.tensordot(direction, offset, axes=1) / np.maximum(distance, 1e-6)
        shell = 1.0 - np.abs(distance - radius) / (thickness / 2)
        level = np.where(facing > rng.uniform(-0.3, 0.4), shell, -1.0)
    else:
        raise ValueError(f"unknown lesion kind '{kind}' (kinds: {', '.join(LESION_KINDS)})")
    return np.clip(level, 0.0, None).astype(np.float32)


def lesion_intensity(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The lesion's own intensity field in [0, 1]: a base level and a texture of random strength."""
    if kind == "cyst":
        base = rng.uniform(0.02, 0.25) if rng.random() < 0.6 else rng.uniform(0.75, 0.95)
        amplitude = rng.uniform(0.0, 0.03)
    elif kind == "polyp":
        base, amplitude = rng.uniform(0.35, 0.85), rng.uniform(0.08, 0.2)
    else:
        base, amplitude = rng.uniform(0.5, 0.9), rng.uniform(0.05, 0.15)
    texture = smooth_noise(shape, rng, sigma=rng.uniform(0.7, 2.0))
    return np.clip(base + amplitude * texture, 0.02, 0.98).astype(np.float32)


def insert_lesion(crop: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(crop with a lesion of `kind`, its boolean mask). Voxels outside the mask are left untouched."""
    size = crop.shape[0]
    level = lesion_shape(kind, size, rng)
    mask = level > 0
    edge = np.clip(level * rng.uniform(2.0, 6.0), 0.0, 1.0)  # soft border, reaching 1 inside
    weight = np.where(mask, rng.uniform(0.6, 1.0) * edge, 0.0).astype(np.float32)
    lesion = lesion_intensity(kind, crop.shape, rng)
    out = crop.astype(np.float32).copy()
    out[mask] = (1.0 - weight[mask]) * crop[mask] + weight[mask] * lesion[mask]
    return out, mask

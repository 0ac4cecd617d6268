"""Small generator stages: volumes → crops (views, neighbour, location) → block shuffle → batches.

Randomness is drawn from generators seeded by position (stream, volume index, block index), never
carried from one volume to the next, so a stream restarted at a position reproduces it exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count, islice

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
)

from sslmed.config import DataConfig
from sslmed.data.sources import Sample, SkipCounter, Volume
from sslmed.errors import ConfigError
from sslmed.io.register import atlas_location

FOREGROUND_LEVEL = 0.1  # normalised intensity above which a voxel counts as foreground
FOREGROUND_POINTS = 4096  # candidate centres kept per volume; enough for a uniform pick


@dataclass(frozen=True)
class Streamed:
    """A volume as it enters the crop stage: its index in the stream and the epoch it belongs to."""

    index: int
    epoch: int
    sample: Sample


# Per-crop MONAI augmentation by family (`data.augment_families`), applied in this order. Flips mirror
# anatomy (left/right, head/feet), which a brain never shows; the MRI families instead imitate what
# differs between scanners and subjects: coil bias fields, contrast (gamma), resolution (blur), noise.
AUGMENT_FAMILIES = {
    "flip": lambda: [RandFlip(prob=0.5, spatial_axis=axis) for axis in range(3)],
    "affine": lambda: [RandAffine(prob=0.5, rotate_range=(0.15, 0.15, 0.15), scale_range=(0.1, 0.1, 0.1),
                                  padding_mode="zeros", mode="bilinear")],
    "bias_field": lambda: [RandBiasField(prob=0.5, degree=3, coeff_range=(0.0, 0.3))],
    "gamma": lambda: [RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5))],
    "blur": lambda: [RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.5), sigma_y=(0.25, 1.5),
                                        sigma_z=(0.25, 1.5))],
    "intensity": lambda: [RandScaleIntensity(factors=0.1, prob=0.5),
                          RandShiftIntensity(offsets=0.05, prob=0.5)],
    "noise": lambda: [RandGaussianNoise(prob=0.3, std=0.02)],
}


def augmentation(families: Sequence[str] = ("flip", "affine", "intensity", "noise")) -> Compose:
    """The per-crop MONAI augmentation made of `families` (keys of AUGMENT_FAMILIES)."""
    unknown = [name for name in families if name not in AUGMENT_FAMILIES]
    if unknown:
        raise ConfigError(f"data.augment_families: unknown {unknown} (known: {', '.join(AUGMENT_FAMILIES)})")
    return Compose([t for name in AUGMENT_FAMILIES if name in families for t in AUGMENT_FAMILIES[name]()])


def start_range(dim: int, size: int) -> tuple[int, int]:
    """Inclusive range of crop starts: inside the volume, or (volume smaller than the crop) centred in it."""
    if dim >= size:
        return 0, dim - size
    return max(dim - size, -(size // 2)), min(0, dim - size // 2)


def clip_start(start: np.ndarray, shape: Sequence[int], size: int) -> np.ndarray:
    bounds = [start_range(d, size) for d in shape]
    return np.array([min(max(int(s), lo), hi) for s, (lo, hi) in zip(start, bounds, strict=True)])


def location(start: np.ndarray, shape: Sequence[int], size: int, meta: dict | None = None) -> np.ndarray:
    """Where a crop is: in a volume packed with an atlas, its centre in the template's coordinates scaled
    to [−1, 1]; otherwise the crop centre divided by the volume shape (in [0, 1] for every start
    `start_range` allows)."""
    if meta is not None and "atlas_affine" in meta:
        return atlas_location(np.asarray(start) + (size - 1) / 2, meta)
    return ((start + size / 2) / np.asarray(shape, dtype=np.float64)).clip(0, 1).astype(np.float32)


def foreground_points(volume: Volume, rng: np.random.Generator) -> np.ndarray:
    points = np.argwhere(volume.read() > FOREGROUND_LEVEL)
    if len(points) > FOREGROUND_POINTS:
        points = points[rng.choice(len(points), FOREGROUND_POINTS, replace=False)]
    return points


class Cropper:
    """Cuts `crops_per_volume` crops (plus second view / neighbour) from each volume and augments them."""

    def __init__(self, cfg: DataConfig, seed: int, stream: tuple[int, int], skips: SkipCounter):
        self.cfg, self.seed, self.stream, self.skips = cfg, seed, stream, skips
        self.augment = augmentation(cfg.augment_families) if cfg.augment else None
        self.view_shift = max(1, cfg.crop_size // 8)

    def __call__(self, volumes: Iterable[Streamed], skip_first: int = 0) -> Iterator[dict]:
        for item in volumes:
            crops = self.crops(item)
            if skip_first:
                crops, skip_first = islice(crops, skip_first, None), 0
            yield from crops

    def crops(self, item: Streamed) -> Iterator[dict]:
        cfg, size = self.cfg, self.cfg.crop_size
        rng = np.random.default_rng([self.seed, *self.stream, item.index])
        try:
            volume = item.sample.load()
        except (ValueError, RuntimeError, OSError) as exc:  # passed the header checks, fails to decompress
            self.skips.sample(item.sample.key, f"cannot decode: {exc}")
            return
        shape = volume.shape
        fg_rng = np.random.default_rng([self.seed, *self.stream, item.index, 2])
        foreground = functools.cache(lambda: foreground_points(volume, fg_rng))
        # every plan (and so every random draw) is made up front: skipping crops cannot shift later ones
        plans = [self.plan(rng, foreground, shape) for _ in range(cfg.crops_per_volume)]
        for plan in plans:
            crop = {"key": item.sample.key, "tags": dict(item.sample.meta.get("tags", {})),
                    "epoch": item.epoch, "start": plan["start"],
                    "location": location(plan["start"], shape, size, item.sample.meta),
                    "image": self.view(volume, plan["start"], plan["seeds"][0])}
            if cfg.views == 2:
                crop["image2"] = self.view(volume, plan["start2"], plan["seeds"][1])
            if cfg.neighbour:
                crop["neighbour"] = self.view(volume, plan["neighbour"], plan["seeds"][2])
                crop["neighbour_location"] = location(plan["neighbour"], shape, size, item.sample.meta)
                crop["neighbour_start"] = plan["neighbour"]
            yield crop

    def plan(self, rng: np.random.Generator, foreground: Callable[[], np.ndarray],
             shape: tuple[int, int, int]) -> dict:
        cfg, size = self.cfg, self.cfg.crop_size
        centre = None
        if cfg.foreground_bias > 0 and rng.random() < cfg.foreground_bias:
            points = foreground()  # the whole volume is read once, only when a biased centre is drawn
            centre = points[rng.integers(len(points))] if len(points) else None
        if centre is None:
            start = np.array([rng.integers(lo, hi + 1) for lo, hi in (start_range(d, size) for d in shape)])
        else:
            start = clip_start(centre - size // 2, shape, size)
        shift2 = rng.integers(-self.view_shift, self.view_shift + 1, 3)
        shift_n = rng.integers(-cfg.neighbour_shift, cfg.neighbour_shift + 1, 3)
        return {"start": start, "start2": clip_start(start + shift2, shape, size),
                "neighbour": clip_start(start + shift_n, shape, size),
                "seeds": [int(s) for s in rng.integers(0, 2**31 - 1, 3)]}

    def view(self, volume: Volume, start: np.ndarray, seed: int) -> np.ndarray:
        size = self.cfg.crop_size
        crop = volume.read_crop(start, (size, size, size))[None]
        if self.augment is None:
            return crop
        self.augment.set_random_state(seed=seed)
        return np.asarray(self.augment(crop), dtype=np.float32)


def block_shuffle(crops: Iterable[dict], block_size: int, seed: int, stream: tuple[int, int],
                  first_block: int = 0, skip: int = 0) -> Iterator[dict]:
    """Shuffle within consecutive blocks of `block_size` crops (the shuffle buffer).

    Fixed blocks with a per-block seed, rather than a reservoir, keep the output order a pure function
    of the position: a resumed stream rebuilds the block it stopped in and drops what was consumed.
    """
    crops = iter(crops)
    for block_index in count(first_block):
        block = list(islice(crops, block_size))
        if not block:
            return
        order = np.random.default_rng([seed, *stream, block_index, 1]).permutation(len(block))
        for i in order[skip:]:
            yield block[i]
        skip = 0


def batches(crops: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    crops = iter(crops)
    while batch := list(islice(crops, batch_size)):
        yield batch


def matches(tags: dict, wanted: dict[str, str]) -> bool:
    """Tag filter (data.filter_tags): every wanted tag present with exactly that value."""
    return all(str(tags.get(k)) == v for k, v in wanted.items())


def collate(batch: list[dict]) -> dict:
    """Crops → the batch dict of docs/architecture.md."""
    out = {"image": torch.from_numpy(np.stack([c["image"] for c in batch])),
           "location": torch.from_numpy(np.stack([c["location"] for c in batch])),
           "key": [c["key"] for c in batch], "tags": [c["tags"] for c in batch],
           "start": torch.from_numpy(np.stack([c["start"] for c in batch]).astype(np.int64))}
    if "image2" in batch[0]:
        out["image2"] = torch.from_numpy(np.stack([c["image2"] for c in batch]))
    if "neighbour" in batch[0]:
        out["neighbour"] = torch.from_numpy(np.stack([c["neighbour"] for c in batch]))
        out["neighbour_location"] = torch.from_numpy(np.stack([c["neighbour_location"] for c in batch]))
        starts = np.stack([c["neighbour_start"] for c in batch]).astype(np.int64)
        out["neighbour_start"] = torch.from_numpy(starts)
    return out

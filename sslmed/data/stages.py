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
from sslmed.data.augment import DEFAULT as DEFAULT_AUGMENTATION
from sslmed.data.augment import Ranges, ranges_of
from sslmed.data.roi import load_roi_centres, roi_centre
from sslmed.data.sources import Sample, SkipCounter, StoredVolume
from sslmed.io.register import atlas_location

FOREGROUND_LEVEL = 0.1  # normalised intensity above which a voxel counts as foreground
FOREGROUND_POINTS = 4096  # candidate centres kept per volume; enough for a uniform pick


@dataclass(frozen=True)
class Streamed:
    """A volume as it enters the crop stage: its index in the stream and the epoch it belongs to."""

    index: int
    epoch: int
    sample: Sample


SPATIAL_TRANSFORMS = 4  # the first transforms of `augmentation`: the flips and the affine


def augmentation(ranges: Ranges = DEFAULT_AUGMENTATION) -> Compose:
    """Per-crop MONAI augmentation (`data.augment_on=loader`): the families, ranges and order that
    `sslmed.data.augment` applies to whole batches on the training device. Its first
    `SPATIAL_TRANSFORMS` move voxels (a target goes through them too); the rest change intensity."""
    r = ranges
    return Compose([
        RandFlip(prob=r.flip_prob, spatial_axis=0),
        RandFlip(prob=r.flip_prob, spatial_axis=1),
        RandFlip(prob=r.flip_prob, spatial_axis=2),
        RandAffine(prob=r.affine_prob, rotate_range=(r.rotate,) * 3, scale_range=(r.scale,) * 3,
                   translate_range=(r.translate,) * 3, padding_mode="zeros", mode="bilinear"),
        RandScaleIntensity(factors=r.intensity_scale, prob=r.intensity_scale_prob),
        RandShiftIntensity(offsets=r.shift, prob=r.shift_prob),
        RandAdjustContrast(prob=r.gamma_prob, gamma=r.gamma),
        RandBiasField(degree=r.bias_degree, coeff_range=r.bias_coeff, prob=r.bias_prob),
        RandGaussianSmooth(sigma_x=r.blur_sigma, sigma_y=r.blur_sigma, sigma_z=r.blur_sigma,
                           prob=r.blur_prob),
        RandGaussianNoise(prob=r.noise_prob, std=r.noise_std),
    ])


def start_range(dim: int, size: int) -> tuple[int, int]:
    """Inclusive range of crop starts: inside the volume, or (volume smaller than the crop) centred in it."""
    if dim >= size:
        return 0, dim - size
    return max(dim - size, -(size // 2)), min(0, dim - size // 2)


def clip_start(start: np.ndarray, shape: Sequence[int], size: int) -> np.ndarray:
    bounds = [start_range(d, size) for d in shape]
    return np.array([min(max(int(s), lo), hi) for s, (lo, hi) in zip(start, bounds, strict=True)])


def location(start: np.ndarray, shape: Sequence[int], size: int, meta: dict | None = None) -> np.ndarray:
    """Where a crop is, in [−1, 1] per axis: in a volume packed with an atlas, its centre in the
    template's coordinates scaled by the template's extent; otherwise its centre scaled by the volume's
    extent, 2 · centre / shape − 1 (clipped: a crop larger than the volume is centred in it)."""
    if meta is not None and "atlas_affine" in meta:
        return atlas_location(np.asarray(start) + (size - 1) / 2, meta)
    fraction = (start + size / 2) / np.asarray(shape, dtype=np.float64)
    return (2.0 * fraction - 1.0).clip(-1, 1).astype(np.float32)


def foreground_points(volume: StoredVolume, rng: np.random.Generator) -> np.ndarray:
    points = np.argwhere(volume.read() > FOREGROUND_LEVEL)
    if len(points) > FOREGROUND_POINTS:
        points = points[rng.choice(len(points), FOREGROUND_POINTS, replace=False)]
    return points


class Cropper:
    """Cuts `crops_per_volume` crops (plus second view / neighbour) from each volume and augments them."""

    def __init__(self, cfg: DataConfig, seed: int, stream: tuple[int, int], skips: SkipCounter):
        self.cfg, self.seed, self.stream, self.skips = cfg, seed, stream, skips
        # on the training device the loader leaves crops as stored; sslmed.data.augment converts them there
        loader_side = cfg.augment and cfg.augment_on == "loader"
        self.augment = augmentation(ranges_of(cfg)) if loader_side else None
        self.view_shift = max(1, cfg.crop_size // 8)
        self.rois = load_roi_centres(cfg.roi_centres) if cfg.roi_centres else None

    def __call__(self, volumes: Iterable[Streamed], skip_first: int = 0) -> Iterator[dict]:
        for item in volumes:
            crops = self.crops(item)
            if skip_first:
                crops, skip_first = islice(crops, skip_first, None), 0
            yield from self.counting_read_errors(item, crops)

    def counting_read_errors(self, item: Streamed, crops: Iterator[dict]) -> Iterator[dict]:
        """A lazily read (Zarr) volume fails when a crop reads a damaged chunk (checksum, codec): the
        rest of that volume is a counted skip (fatal under data.strict), not a crash."""
        try:
            yield from crops
        except (ValueError, RuntimeError, OSError) as exc:
            self.skips.sample(item.sample.key, f"cannot read: {exc}")

    def crops(self, item: Streamed) -> Iterator[dict]:
        cfg, size = self.cfg, self.cfg.crop_size
        rng = np.random.default_rng([self.seed, *self.stream, item.index])
        rois = None if self.rois is None else self.rois.get(item.sample.key)
        if self.rois is not None and rois is None:
            self.skips.sample(item.sample.key, f"no ROI centre in {cfg.roi_centres}")
            return
        try:
            volume = item.sample.load()
        except (ValueError, RuntimeError, OSError) as exc:  # passed the header checks, fails to decompress
            self.skips.sample(item.sample.key, f"cannot decode: {exc}")
            return
        shape = volume.shape
        fg_rng = np.random.default_rng([self.seed, *self.stream, item.index, 2])
        foreground = functools.cache(lambda: foreground_points(volume, fg_rng))
        # every plan (and so every random draw) is made up front: skipping crops cannot shift later ones
        plans = [self.plan(rng, foreground, shape, rois) for _ in range(cfg.crops_per_volume)]
        for plan in plans:
            crop = {"key": item.sample.key, "tags": dict(item.sample.meta.get("tags", {})),
                    "epoch": item.epoch, "start": plan["start"],
                    "location": location(plan["start"], shape, size, item.sample.meta),
                    **cut_view("image", volume, plan["start"], size, self.augment, plan["seeds"][0],
                               with_target=volume.target is not None, with_clean=cfg.clean_view)}
            if self.augment is None:
                crop["intensity"] = np.array([volume.scale, volume.offset], dtype=np.float32)
            if cfg.views == 2:
                crop.update(self.view("image2", volume, plan["start2"], plan["seeds"][1]))
            if cfg.neighbour:
                crop.update(self.view("neighbour", volume, plan["neighbour"], plan["seeds"][2]))
                crop["neighbour_location"] = location(plan["neighbour"], shape, size, item.sample.meta)
                crop["neighbour_start"] = plan["neighbour"]
            yield crop

    def plan(self, rng: np.random.Generator, foreground: Callable[[], np.ndarray],
             shape: tuple[int, int, int], rois: np.ndarray | None = None) -> dict:
        cfg, size = self.cfg, self.cfg.crop_size
        centre = None
        if rois is not None:
            centre = roi_centre(rois, rng, cfg.roi_jitter)
        elif cfg.foreground_bias > 0 and rng.random() < cfg.foreground_bias:
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

    def view(self, name: str, volume: StoredVolume, start: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return cut_view(name, volume, start, self.cfg.crop_size, self.augment, seed)


def cut_view(name: str, volume: StoredVolume, start: np.ndarray, size: int, augment: Compose | None,
             seed: int, with_target: bool = False, with_clean: bool = False) -> dict[str, np.ndarray]:
    """`{name: crop}` augmented here (float32), or, without `augment`, `{name: stored crop, name_valid:
    its box inside the volume}` for conversion and augmentation on the training device. `with_target`
    adds `target`: the volume's target cut from the same box (and, here, moved by the same flips and
    affine, untouched by the intensity transforms); `with_clean` adds `<name>_clean`: here, the crop after
    the flips and affine only (on the device, `augment.prepare` makes it)."""
    shape = (size,) * 3
    if augment is None:
        stored, box = volume.read_stored_crop(start, shape)
        out = {name: stored[None], f"{name}_valid": box}
        if with_target:
            out["target"] = volume.read_target_crop(start, shape)[None]
        return out
    augment.set_random_state(seed=seed)
    image = volume.read_crop(start, shape)[None]
    if not (with_target or with_clean):
        return {name: np.asarray(augment(image), dtype=np.float32)}
    target = [volume.read_target_crop(start, shape)[None].astype(np.float32)] if with_target else []
    moved = np.asarray(augment(np.concatenate([image, *target]), end=SPATIAL_TRANSFORMS), dtype=np.float32)
    out = {name: np.asarray(augment(moved[:1], start=SPATIAL_TRANSFORMS), dtype=np.float32)}
    if with_target:
        out["target"] = moved[1:]
    if with_clean:
        out[f"{name}_clean"] = moved[:1]
    return out


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
    for name in ("image2", "neighbour", "neighbour2", "target", "image_clean", "intensity", "image_valid",
                 "image2_valid", "neighbour_valid", "neighbour2_valid"):
        if name in batch[0]:
            out[name] = torch.from_numpy(np.stack([c[name] for c in batch]))
    for name in ("neighbour", "neighbour2"):
        if name in batch[0]:
            out[f"{name}_location"] = torch.from_numpy(np.stack([c[f"{name}_location"] for c in batch]))
            starts = np.stack([c[f"{name}_start"] for c in batch]).astype(np.int64)
            out[f"{name}_start"] = torch.from_numpy(starts)
    return out

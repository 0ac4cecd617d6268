"""Atlas-grid sampling (`data.sampling: atlas_grid`): crops at fixed grid points of the atlas template,
each mapped into every registered subject, one grid point per batch across subjects.

The grid: points every `data.grid_step` millimetres of the template, centred in it, kept where the
template mask holds (`data.grid_mask`, or template intensity above `data.grid_threshold`). A point's
`location` is its template position scaled to [−1, 1] by the template's extent, as `atlas_location`
scales a crop centre, so point *i* is the same place, with the same location, in every subject. Its two
nearest grid points (ties by index) are its neighbours.

The stream: the rank's worker stream of volumes (pipeline.volume_stream) is cut into *rounds* of
`train.micro_batch` consecutive volumes. A round yields one batch per grid point present in at least
two of its volumes, in a seeded order: the crops of that grid point in each volume of the round. A grid
point whose centre falls outside a subject's volume is counted (`grid_points` in the skip counter) and
that subject is missing from its batch, which is then smaller. A stream's position is (its round's
first volume, batches made before that round, its epoch bookmark); with the count of batches made,
it resumes exactly. Every random draw is seeded by (seed, rank, worker, round, grid point, subject).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path

import numpy as np

from sslmed.config import Config, DataConfig
from sslmed.data.augment import ranges_of
from sslmed.data.sources import PackedDataset, SkipCounter, StoredVolume
from sslmed.data.stages import augmentation, collate, cut_view
from sslmed.errors import DataError
from sslmed.io.manifest import load_manifest

log = logging.getLogger(__name__)

NEIGHBOURS = 2  # the nearest grid points delivered with each crop (DrasCLR's neighbour term)
PACK_WITH_ATLAS = "pack it with `sslmed pack --atlas TEMPLATE` (each volume registered to the template)"
MIN_CROPS = 2  # crops per grid batch: one subject alone has nothing to be contrasted with

GridMark = tuple[int, int, int, int]  # (epoch, epoch's first volume, round's first volume, batches before)


@dataclass(frozen=True)
class Grid:
    template: str
    world: np.ndarray  # (P, 3) template millimetres (RAS) of each grid point
    location: np.ndarray  # (P, 3) float32: world scaled to [−1, 1] by the template's extent
    neighbours: np.ndarray  # (P, NEIGHBOURS) indices of the nearest other grid points

    @property
    def size(self) -> int:
        return len(self.world)


# ---- the grid on the template ---------------------------------------------------------------------


def template_of(data: DataConfig) -> str:
    """`data.grid_template`, or the template the dataset at `data.path` was packed with (its manifest)."""
    if data.grid_template:
        path = data.grid_template
    else:
        if not data.path:
            raise DataError("data.sampling: atlas_grid needs data.path (a dataset packed with --atlas) or "
                            "data.grid_template")
        path = load_manifest(data.path).get("preprocessing", {}).get("atlas")
        if not path:
            raise DataError(f"{data.path} was packed without an atlas, so its volumes have no atlas "
                            f"coordinates for data.sampling: atlas_grid; {PACK_WITH_ATLAS}")
    if not Path(path).is_file():
        raise DataError(f"atlas template {path} not found: set data.grid_template to the template file "
                        "the data was packed with")
    return str(path)


def grid_size(cfg: Config) -> int:
    """The number of grid points `data.sampling: atlas_grid` visits (methods size per-location state by
    it); reads the template once per process."""
    return load_grid(cfg.data).size


def load_grid(data: DataConfig) -> Grid:
    return build_grid(template_of(data), float(data.grid_step), data.grid_mask, float(data.grid_threshold))


@functools.lru_cache(maxsize=4)
def build_grid(template: str, step_mm: float, mask_path: str = "", threshold: float = 0.1) -> Grid:
    from sslmed.io.register import load_template, world_bounds

    image, affine = load_template(template)
    mask = read_mask(mask_path, image.shape, affine) if mask_path else image > threshold
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axes = [centred_points(n, step_mm / s) for n, s in zip(image.shape, spacing, strict=True)]
    voxels = np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).T
    nearest = np.clip(np.round(voxels).astype(int), 0, np.asarray(image.shape) - 1)
    voxels = voxels[mask[tuple(nearest.T)]]
    if len(voxels) <= NEIGHBOURS:
        raise DataError(f"the atlas grid on {template} (step {step_mm:g} mm) has {len(voxels)} point(s) in "
                        f"the template mask; it needs more than {NEIGHBOURS}: lower data.grid_step or "
                        "check data.grid_mask / data.grid_threshold")
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    low, high = world_bounds(image.shape, affine)
    location = (2.0 * (world - low) / (high - low) - 1.0).astype(np.float32)
    return Grid(template, world, location, nearest_points(world))


def centred_points(n: int, step: float) -> np.ndarray:
    """Voxel positions every `step` voxels along an axis of `n`, the set centred on the axis."""
    k = int(np.floor((n - 1) / step)) + 1
    return ((n - 1) - (k - 1) * step) / 2 + step * np.arange(k)


def nearest_points(world: np.ndarray) -> np.ndarray:
    """(P, NEIGHBOURS): each point's nearest other points; equal distances (a regular grid) go to the
    lower index, so the choice is the same on every machine."""
    from scipy.spatial import cKDTree

    k = min(len(world), 8 * NEIGHBOURS + 1)
    distances, indices = cKDTree(world).query(world, k=k)
    out = np.empty((len(world), NEIGHBOURS), dtype=np.int64)
    for i in range(len(world)):
        others = [(round(float(d), 6), int(j)) for d, j in zip(distances[i], indices[i], strict=True)
                  if j != i]
        out[i] = [j for _, j in sorted(others)[:NEIGHBOURS]]
    return out


def read_mask(path: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A mask volume on the template's voxel grid (after RAS orientation, as the template): nonzero kept."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from sslmed.errors import VolumeError
    from sslmed.io.readers import read_volume

    try:
        volume = read_volume(path)
    except VolumeError as exc:
        raise DataError(f"data.grid_mask {path}: {exc}") from None
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None],
                       affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    array = np.asarray(image.array[0])
    if array.shape != tuple(shape) or not np.allclose(np.asarray(image.affine), affine, atol=1e-3):
        raise DataError(f"data.grid_mask {path} is not on the template's voxel grid (shape {array.shape}, "
                        f"template {tuple(shape)}): resample it to the template first")
    return array > 0


# ---- grid points in a subject ---------------------------------------------------------------------


def subject_centres(grid: Grid, meta: dict) -> np.ndarray:
    """(P, 3) voxel positions of every grid point in a registered volume: through the inverse of its
    `atlas_affine` (volume voxel → template mm)."""
    to_voxel = np.linalg.inv(np.asarray(meta["atlas_affine"], dtype=np.float64))
    return grid.world @ to_voxel[:3, :3].T + to_voxel[:3, 3]


def inside_volume(centres: np.ndarray, shape) -> np.ndarray:
    """(P,) whether each centre lies within the volume's voxel extent."""
    return np.all((centres >= -0.5) & (centres <= np.asarray(shape) - 0.5), axis=1)


def crop_start(centre: np.ndarray, size: int) -> np.ndarray:
    """The first voxel of the crop of `size` centred on `centre` (`location` reads the centre of a crop
    at `start` as start + (size − 1) / 2)."""
    return np.round(np.asarray(centre) - (size - 1) / 2).astype(np.int64)


# ---- the stream -----------------------------------------------------------------------------------


@dataclass
class Subject:
    slot: int  # place in its round
    key: str
    meta: dict
    epoch: int
    volume: StoredVolume
    inside: np.ndarray  # (P,) bool
    centres: np.ndarray  # (P, 3)


def stream_grid_batches(dataset: PackedDataset, cfg: Config, rank: int, world: int, worker: int, workers: int,
                        done: int, mark: tuple[int, ...]) -> Iterator[tuple[dict, dict]]:
    """(batch, info) pairs of one grid stream, starting after its first `done` batches; `mark` is the
    GridMark the stream reported with its last batch (absent: from the start)."""
    from sslmed.data.pipeline import volume_stream  # the pipeline imports this module

    grid = load_grid(cfg.data)
    size = cfg.train.micro_batch
    # a GridMark, or (epoch, first volume) from Loader.start_at_epoch: that epoch from its start
    epoch, epoch_first, first, before = mark if len(mark) == 4 else (mark[0], mark[1], mark[1], 0)
    if before > done:  # a bookmark from further on than asked for: start from the beginning
        epoch, epoch_first, first, before = 0, 0, 0, 0
    skips, marks = SkipCounter(strict=cfg.data.strict), []
    volumes = volume_stream(dataset, cfg, rank, world, worker, workers, (epoch, epoch_first), first, skips,
                            marks)
    cutter = GridCropper(cfg.data, grid, cfg.train.seed, (rank, worker), skips)
    made, barren = before, 0
    for round_first in count(first, size):
        subjects = cutter.load(islice(volumes, size))
        order = cutter.order(round_first // size, subjects)
        barren = 0 if len(order) else barren + 1
        if barren * size > 2 * len(dataset.keys):  # every volume twice over, and not one crop
            raise DataError(f"{cfg.data.path}: no {MIN_CROPS} volumes of a round of train.micro_batch "
                            f"{size} hold a common point of the atlas grid (skipped so far: "
                            f"{skips.as_dict()}); {PACK_WITH_ATLAS}")
        for position, point in enumerate(order):
            made += 1
            if made <= done:
                continue
            crops = cutter.crops(round_first // size, point, subjects)
            next_first, next_before = following(round_first, size, made, position, len(order))
            bookmark = max((m for m in marks if m[1] <= next_first), default=(0, 0))
            marks[:] = [m for m in marks if m >= bookmark]  # later positions never need older bookmarks
            info = {"worker": worker, "epoch": max(c["epoch"] for c in crops),
                    "mark": (*bookmark, next_first, next_before), "skipped": skips.as_dict()}
            batch = collate(crops)
            batch["grid_point"] = [int(point)] * len(crops)
            yield batch, info


def following(round_first: int, size: int, made: int, position: int, batches: int) -> tuple[int, int]:
    """Where the batch after the `made`-th (at `position` of its round's `batches`) lies: its round's first
    volume and the batches made before that round."""
    if position == batches - 1:
        return round_first + size, made
    return round_first, made - position - 1


class GridCropper:
    """Loads a round's volumes and cuts their crops at one grid point (views, two neighbours)."""

    def __init__(self, data: DataConfig, grid: Grid, seed: int, stream: tuple[int, int], skips: SkipCounter):
        self.data, self.grid, self.seed, self.stream, self.skips = data, grid, seed, stream, skips
        loader_side = data.augment and data.augment_on == "loader"
        self.augment = augmentation(ranges_of(data)) if loader_side else None

    def load(self, items) -> list[Subject]:
        subjects = []
        for slot, item in enumerate(items):
            meta = item.sample.meta
            if "atlas_affine" not in meta:
                self.skips.sample(item.sample.key, f"no atlas registration; {PACK_WITH_ATLAS}")
                continue
            try:
                volume = item.sample.load()
            except (ValueError, RuntimeError, OSError) as exc:
                self.skips.sample(item.sample.key, f"cannot decode: {exc}")
                continue
            centres = subject_centres(self.grid, meta)
            inside = inside_volume(centres, volume.shape)
            self.skips.outside(item.sample.key, int((~inside).sum()))
            subjects.append(Subject(slot, item.sample.key, meta, item.epoch, volume, inside, centres))
        return subjects

    def order(self, round_index: int, subjects: list[Subject]) -> np.ndarray:
        """The round's grid points that at least MIN_CROPS subjects hold, in an order seeded by the round
        (not the rank: ranks at the same round visit the same points in the same order). A point only one
        subject holds is counted with the outside points: a batch of one crop has no other subject to
        contrast with, and batch normalisation cannot run on it."""
        held = np.zeros(self.grid.size, dtype=int)
        for subject in subjects:
            held += subject.inside
        present = held >= MIN_CROPS
        for subject in subjects:
            self.skips.outside(subject.key, int((subject.inside & ~present).sum()))
        rng = np.random.default_rng([self.seed, self.stream[1], round_index, 3])
        permutation = rng.permutation(self.grid.size)
        return permutation[present[permutation]]

    def crops(self, round_index: int, point: int, subjects: list[Subject]) -> list[dict]:
        out = []
        size = self.data.crop_size
        near = self.grid.neighbours[point]
        for subject in subjects:
            if not subject.inside[point]:
                continue
            rng = np.random.default_rng([self.seed, *self.stream, round_index, int(point), subject.slot])
            seeds = [int(s) for s in rng.integers(0, 2**31 - 1, 4)]
            start = crop_start(subject.centres[point], size)
            crop = {"key": subject.key, "tags": dict(subject.meta.get("tags", {})), "epoch": subject.epoch,
                    "start": start, "location": self.grid.location[point],
                    **self.view("image", subject.volume, start, seeds[0])}
            if self.augment is None:
                crop["intensity"] = np.array([subject.volume.scale, subject.volume.offset], dtype=np.float32)
            if self.data.views == 2:
                crop.update(self.view("image2", subject.volume, start, seeds[1]))  # the same patch
            if self.data.neighbour:
                for name, other, seed in zip(("neighbour", "neighbour2"), near, seeds[2:], strict=True):
                    other_start = crop_start(subject.centres[other], size)
                    crop.update(self.view(name, subject.volume, other_start, seed))
                    crop[f"{name}_location"] = self.grid.location[other]
                    crop[f"{name}_start"] = other_start
            out.append(crop)
        return out

    def view(self, name: str, volume: StoredVolume, start: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return cut_view(name, volume, start, self.data.crop_size, self.augment, seed)

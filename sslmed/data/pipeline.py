"""`build_loader(cfg, rank, world)`: the endless, resumable stream of crop batches for one rank.

Each (rank, worker) runs its own *stream*: epochs of units (shards.epoch_units) → volumes → crops →
block shuffle → batches. A stream's output is a pure function of (seed, rank, worker) and how many
batches it has produced. Worker streams are endless, so a DataLoader takes their batches strictly in
turn (worker 0, 1, …, 0, 1, …): the number of batches the loader has handed out fixes every
stream's position, and that count (plus an epoch bookmark per stream, to skip whole epochs) is the
whole resumable state.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from itertools import count

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslmed.config import Config
from sslmed.data import shards
from sslmed.data.grid import load_grid, stream_grid_batches
from sslmed.data.sources import PackedDataset, SkipCounter, open_dataset
from sslmed.data.stages import Cropper, Streamed, batches, block_shuffle, collate, matches
from sslmed.errors import ConfigError, DataError, SslmedError

log = logging.getLogger(__name__)
STATE_VERSION = 1

Mark = tuple[int, ...]  # (epoch, index of the stream's first volume in that epoch); atlas_grid: GridMark


def volume_stream(dataset: PackedDataset, cfg: Config, rank: int, world: int, worker: int, workers: int,
                  start: Mark, skip_to: int, skips: SkipCounter, marks: list[Mark]) -> Iterator[Streamed]:
    """Endless volumes of one stream from bookmark `start`; those before index `skip_to` are passed
    without decoding (whole units at once when the manifest's count can be trusted)."""
    wanted = cfg.data.filter_tags
    index, barren = start[1], 0
    for epoch in count(start[0]):
        marks.append((epoch, index))
        for unit in shards.epoch_units(dataset.units, cfg.train.seed, epoch, rank, world, worker, workers):
            size = None if wanted else dataset.unit_size(unit)
            if size is not None and index + size <= skip_to:
                index, barren = index + size, 0
                continue
            found = False
            for sample in dataset.samples(unit, skips):
                if not matches(sample.meta.get("tags", {}), wanted):
                    continue
                found = True
                if index >= skip_to:
                    yield Streamed(index, epoch, sample)
                index += 1
            barren = 0 if found else barren + 1
            if barren > 2 * len(dataset.units):  # twice the unit count in a row: nothing will ever come
                raise DataError(f"{cfg.data.path}: no usable sample in {barren} shards/arrays in a row "
                                f"(data.filter_tags={wanted}, skipped so far: {skips.as_dict()})")


def stream_batches(dataset: PackedDataset, cfg: Config, rank: int, world: int, worker: int, workers: int,
                   done: int, mark: Mark) -> Iterator[tuple[dict, dict]]:
    """(batch, info) pairs of one stream, starting after its first `done` batches."""
    data, batch_size = cfg.data, cfg.train.micro_batch
    block = max(1, data.shuffle_buffer)
    here = shards.position(done, batch_size, data.crops_per_volume, block)
    start = mark if mark[1] <= here.volume else (0, 0)
    skips, marks = SkipCounter(strict=data.strict), []
    stream_id = (rank, worker)
    volumes = volume_stream(dataset, cfg, rank, world, worker, workers, start, here.volume, skips, marks)
    crops = Cropper(data, cfg.train.seed, stream_id, skips)(volumes, skip_first=here.crops_into_volume)
    shuffled = block_shuffle(crops, block, cfg.train.seed, stream_id, here.block, here.into_block)
    for produced, batch in enumerate(batches(shuffled, batch_size), start=done + 1):
        next_volume = shards.position(produced, batch_size, data.crops_per_volume, block).volume
        bookmark = max((m for m in marks if m[1] <= next_volume), default=(0, 0))
        marks[:] = [m for m in marks if m >= bookmark]  # later positions never need older bookmarks
        info = {"worker": worker, "epoch": max(c["epoch"] for c in batch), "mark": bookmark,
                "skipped": skips.as_dict()}
        yield collate(batch), info


class CropStream(IterableDataset):
    """The DataLoader's dataset: each worker process runs the stream its rotated worker id names."""

    def __init__(self, cfg: Config, rank: int, world: int, workers: int, consumed: int,
                 marks: dict[int, Mark]):
        super().__init__()
        self.cfg, self.rank, self.world, self.workers = cfg, rank, world, max(1, workers)
        self.consumed, self.marks = consumed, marks

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = shards.logical_worker(physical, self.consumed, self.workers)
        done = shards.batches_of_worker(self.consumed, worker, self.workers)
        keep_freed_memory_for_reuse()
        try:
            dataset = open_dataset(self.cfg.data.path, self.cfg.data.shard_url)
            stream = stream_grid_batches if self.cfg.data.sampling == "atlas_grid" else stream_batches
            yield from stream(dataset, self.cfg, self.rank, self.world, worker, self.workers,
                              done, self.marks.get(worker, (0, 0)))
        except SslmedError as exc:  # handed to the main process as data: a clean one-line error there
            yield None, {"error": str(exc)}


class Loader:
    """Endless batches for one rank; `epoch`, `skipped`, `state_dict()` / `load_state_dict()`."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.batches = 0  # handed out so far: the position of every stream follows from it
        self.epoch = 0
        self.marks: dict[int, Mark] = {}
        self._skipped: dict[int, dict[str, int]] = {}
        self._iterator: Iterator | None = None

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._dataloader())
        batch, info = next(self._iterator)
        if batch is None:
            self.close()
            raise DataError(info["error"])
        self.batches += 1
        self.epoch = info["epoch"]
        self.marks[info["worker"]] = tuple(info["mark"])
        before = self.skipped
        self._skipped[info["worker"]] = info["skipped"]
        if self.skipped != before:
            log.warning("data: skipped so far on rank %d: %s", self.rank, self.skipped)
        return batch

    @property
    def skipped(self) -> dict[str, int]:
        """Corrupt shards and samples skipped by this rank's streams (counted since this loader started)."""
        kinds = ("shards", "samples", "grid_points")
        return {kind: sum(s.get(kind, 0) for s in self._skipped.values()) for kind in kinds}

    def _dataloader(self) -> DataLoader:
        workers = self.cfg.data.workers
        stream = CropStream(self.cfg, self.rank, self.world, workers, self.batches, dict(self.marks))
        # pinned batches let the engine's non_blocking copy to the GPU overlap the step
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=2 if workers else None, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=_single_threaded_decoding if workers else None)

    def layout(self) -> dict:
        """What fixes the streams' order; a resumed run must match it to continue at the same sample."""
        data = self.cfg.data
        layout = {"rank": self.rank, "world": self.world, "workers": max(1, data.workers),
                  "micro_batch": self.cfg.train.micro_batch, "crops_per_volume": data.crops_per_volume,
                  "shuffle_buffer": max(1, data.shuffle_buffer), "seed": self.cfg.train.seed,
                  "filter_tags": dict(data.filter_tags)}
        if data.sampling == "atlas_grid":  # only then: states saved before the grid existed still load
            layout.update(sampling=data.sampling, grid_step=data.grid_step, grid_mask=data.grid_mask,
                          grid_threshold=data.grid_threshold)
        return layout

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "batches": self.batches, "epoch": self.epoch,
                "marks": {str(w): list(m) for w, m in self.marks.items()}, "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data pipeline state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved, current = state["layout"], self.layout()
        changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"cannot continue the data stream at the same sample: {detail}")
        self.close()
        self.batches, self.epoch = int(state["batches"]), int(state["epoch"])
        self.marks = {int(w): tuple(int(v) for v in m) for w, m in state["marks"].items()}

    def start_at_epoch(self, epoch: int) -> None:
        """Every stream from the start of `epoch`: where a position within an epoch cannot carry over
        (another number of ranks), the run still moves on through the epochs' shuffled orders."""
        self.close()
        self.batches, self.epoch = 0, epoch
        self.marks = {worker: (epoch, 0) for worker in range(max(1, self.cfg.data.workers))}

    def close(self) -> None:
        self._iterator = None  # dropping a DataLoader iterator shuts its workers down


def build_loader(cfg: Config, rank: int = 0, world: int = 1) -> Loader:
    data = cfg.data
    checks = [(data.crops_per_volume >= 1, "data.crops_per_volume must be at least 1"),
              (data.workers >= 0, "data.workers must be >= 0"),
              (data.neighbour_shift >= 0, "data.neighbour_shift must be >= 0"),
              (0.0 <= data.foreground_bias <= 1.0, "data.foreground_bias must be in [0, 1]"),
              (not data.shard_url or "{shard}" in data.shard_url,
               "data.shard_url must name the shard as {shard}, e.g. "
               f"pipe:aws s3 cp s3://bucket/ct/{{shard}} - (got {data.shard_url!r})"),
              (0 <= rank < world, f"rank {rank} outside world size {world}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if not data.path:
        raise ConfigError("data.path is empty: set it to a packed dataset directory (sslmed pack --out DIR)")
    open_dataset(data.path, data.shard_url)  # fail here, in the main process, on a missing or empty dataset
    if data.sampling == "atlas_grid":
        load_grid(data)  # and on a dataset packed without an atlas, a missing template, an empty grid
    return Loader(cfg, rank, world)


def _single_threaded_decoding(_worker_id: int) -> None:
    """Parallelism comes from the workers: blosc's own thread pool in each would oversubscribe the cores."""
    from numcodecs import blosc

    blosc.use_threads = False


def keep_freed_memory_for_reuse() -> None:
    """Crops, augmentation intermediates and decoded volumes are megabytes each. glibc serves blocks that
    size with fresh pages from mmap and unmaps them on free, so every crop page-faults its pages in again
    (measured: about a third of the time of a raw-tar stream). Raising the mmap and trim thresholds keeps
    freed blocks in the heap for the next crop. Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value on 64-bit
    libc.mallopt(m_trim_threshold, 256 << 20)

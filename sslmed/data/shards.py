"""Which units (shards or Zarr arrays) a rank's worker reads in an epoch, and where a stream resumes.

Every rank and worker derives its epoch's unit list from (seed, epoch) alone, so no process has to
talk to another. The list is padded by wrap-around to a multiple of ranks × workers: every stream
gets units every epoch, even with fewer units than streams, and the loader is endless anyway, so no
rank ever runs dry while another still needs a collective.

A stream's position is a count of batches. Because every volume yields exactly `crops_per_volume`
crops and shuffling happens in fixed-size blocks, a batch count maps to a volume count, and resuming
walks past whole volumes without decoding them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np


def epoch_units(units: list[str], seed: int, epoch: int, rank: int, world: int,
                worker: int, workers: int) -> list[str]:
    """This (rank, worker)'s units for `epoch`: a seeded shuffle, padded, split by node then by worker.

    The split is webdataset's own (`split_by_node` then `split_by_worker`: islice by rank, then by
    worker) applied to explicit rank/worker numbers instead of ones read from the environment.
    """
    if not units:
        return []
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    streams = world * workers
    padded = -(-len(units) // streams) * streams  # round up to a multiple of the stream count
    shuffled = [units[order[i % len(units)]] for i in range(padded)]
    by_node = islice(shuffled, rank, None, world)
    return list(islice(by_node, worker, None, workers))


def batches_of_worker(consumed: int, worker: int, workers: int) -> int:
    """Batches taken from `worker` when `consumed` batches were drawn round-robin from `workers`."""
    return (consumed - worker + workers - 1) // workers


def logical_worker(physical: int, consumed: int, workers: int) -> int:
    """A restarted DataLoader asks its worker 0 first; rotate so that it continues the right stream."""
    return (physical + consumed) % workers


@dataclass(frozen=True)
class Position:
    """Where a stream resumes: volumes to pass without decoding, crops to drop in the next, etc."""

    volume: int  # index of the first volume to decode, counted over the stream's endless volume sequence
    crops_into_volume: int  # crops of that volume already consumed before the shuffle block starts
    block: int  # index of the first shuffle block
    into_block: int  # outputs of that block already consumed


def position(batches: int, micro_batch: int, crops_per_volume: int, block_size: int) -> Position:
    crops = batches * micro_batch
    block, into_block = divmod(crops, block_size)
    volume, crops_into_volume = divmod(block * block_size, crops_per_volume)
    return Position(volume, crops_into_volume, block, into_block)

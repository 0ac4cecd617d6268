"""Crops around given ROI centres: every crop at (or jittered around) one of its volume's centres."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from sslmed.config import Config
from sslmed.data.pipeline import build_loader
from sslmed.data.sources import open_dataset
from sslmed.data.stages import clip_start
from sslmed.errors import DataError

CROP = 8


def write_centres(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "x", "y", "z"])
        writer.writerows(rows)
    return path


def roi_batches(packed: Path, centres: Path, jitter: float, n: int) -> list[dict]:
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.workers, cfg.data.augment = str(packed), CROP, 0, False
    cfg.data.crops_per_volume, cfg.data.shuffle_buffer, cfg.train.micro_batch = 4, 4, 4
    cfg.data.roi_centres, cfg.data.roi_jitter = str(centres), jitter
    loader = build_loader(cfg, 0, 1)
    return [next(loader) for _ in range(n)]


def test_crops_centre_on_the_given_rois(tmp_path, packed_wds):
    dataset = open_dataset(packed_wds)
    first, second, unlisted = dataset.keys
    rois = {first: [(10, 8, 6), (4, 4, 4)], second: [(12, 9, 7)]}
    centres = write_centres(tmp_path / "rois.csv", [(k, *c) for k, cs in rois.items() for c in cs])
    seen = set()
    for batch in roi_batches(packed_wds, centres, 0.0, 6):
        for key, start in zip(batch["key"], batch["start"].numpy(), strict=True):
            shape = dataset.meta(key)["shape"]
            allowed = [tuple(clip_start(np.array(c) - CROP // 2, shape, CROP)) for c in rois[key]]
            assert tuple(start) in allowed
            seen.add((key, tuple(start)))
    assert unlisted not in {key for key, _ in seen} and len(seen) == 3  # both ROIs of `first` are used

    offsets = []
    for batch in roi_batches(packed_wds, write_centres(tmp_path / "one.csv", [(second, 12, 9, 7)]), 1.5, 6):
        offsets += [s - (np.array([12, 9, 7]) - CROP // 2) for s in batch["start"].numpy()]
    offsets = np.array(offsets)
    assert np.abs(offsets).max() <= 8 and offsets.std() > 0.5  # jittered around the centre, not away


def test_bad_roi_tables_are_refused(tmp_path, packed_wds):
    bad_column = tmp_path / "bad.csv"
    bad_column.write_text("key,x,y\na,1,2\n")
    with pytest.raises(DataError, match="missing column"):
        roi_batches(packed_wds, bad_column, 0.0, 1)
    not_number = write_centres(tmp_path / "nan.csv", [("a", 1, "left", 3)])
    with pytest.raises(DataError, match="row 2"):
        roi_batches(packed_wds, not_number, 0.0, 1)
    with pytest.raises(DataError, match="not a file"):
        roi_batches(packed_wds, tmp_path / "none.csv", 0.0, 1)

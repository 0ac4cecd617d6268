"""Crops around given region-of-interest centres (e.g. an organ's centroid per volume), with jitter.

`data.roi_centres` names a CSV with columns `key`, `x`, `y`, `z`: voxel indices into the packed array
of the sample `key` (RAS axis order, after any resampling at packing time — what `sslmed inspect` and
`read_crop` see). A volume may have several rows (e.g. left and right sinus): each crop picks one of
them at random. Each crop's centre is moved by Gaussian jitter of `data.roi_jitter` voxels per axis
(standard deviation), rounded, and the crop is kept inside the volume where the volume allows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sslmed.errors import DataError

COLUMNS = ("key", "x", "y", "z")


def load_roi_centres(path: str | Path) -> dict[str, np.ndarray]:
    """{key: (n, 3) float voxel centres} from the CSV; a bad file fails naming the file and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.roi_centres: '{path}' is not a file (a CSV with columns key,x,y,z)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if missing := set(COLUMNS) - set(reader.fieldnames or ()):
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} (needs key,x,y,z)")
        centres: dict[str, list[list[float]]] = {}
        for row_number, row in enumerate(reader, start=2):
            try:
                point = [float(row[axis]) for axis in "xyz"]
            except (TypeError, ValueError):
                raise DataError(f"{path}, row {row_number}: x, y, z must be numbers, got "
                                f"{[row[a] for a in 'xyz']}") from None
            if not np.isfinite(point).all():
                raise DataError(f"{path}, row {row_number}: x, y, z must be finite, got {point}")
            centres.setdefault(row["key"], []).append(point)
    if not centres:
        raise DataError(f"{path}: no ROI centre")
    return {key: np.asarray(points) for key, points in centres.items()}


def roi_centre(centres: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """One of `centres`, moved by N(0, jitter²) per axis and rounded to a voxel."""
    centre = centres[rng.integers(len(centres))]
    return np.rint(centre + rng.normal(0.0, jitter, 3)).astype(np.int64)

"""Patient-level features (`eval.pool`): one vector per subject from its crops at every atlas grid point.

As DrasCLR's downstream tasks do, a subject is the set of its located patch embeddings: every grid point
of the atlas template (data.grid_step / grid_mask / grid_threshold, sslmed/data/grid.py) is mapped into
the subject through its registration, the crop there is encoded at the grid point's location, and the
embeddings are pooled: `mean` (a grid point outside the subject's volume is left out) or `concat` (grid
order, P × F long; a point outside the volume is zeros). Needs `eval.data` packed with `--atlas`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from torch import nn

from sslmed.config import Config
from sslmed.data.grid import PACK_WITH_ATLAS, crop_start, inside_volume, load_grid, subject_centres
from sslmed.data.sources import open_dataset
from sslmed.errors import DataError
from sslmed.eval.encoders import extract_features


def pooled_features(cfg: Config, encoder: nn.Module, keys: list[str]) -> np.ndarray:
    """(N, F) for `mean`, (N, P·F) for `concat`: one row per subject `keys` names in `eval.data`."""
    if not (Path(cfg.eval.data) / "manifest.json").is_file():
        raise DataError(f"eval.pool: {cfg.eval.pool} encodes each subject at the atlas grid points, so "
                        f"eval.data must be a packed dataset; {cfg.eval.data} is a folder; {PACK_WITH_ATLAS}")
    grid = load_grid(dataclasses.replace(cfg.data, path=cfg.eval.data))
    dataset = open_dataset(cfg.eval.data)
    size = cfg.data.crop_size
    rows = []
    for key in keys:
        meta = dataset.meta(key)
        if "atlas_affine" not in meta:
            raise DataError(f"eval.pool: sample {key} in {cfg.eval.data} has no atlas registration; "
                            f"{PACK_WITH_ATLAS}")
        centres = subject_centres(grid, meta)
        inside = inside_volume(centres, meta["shape"])
        if not inside.any():
            raise DataError(f"eval.pool: no atlas grid point falls inside sample {key} of {cfg.eval.data}")
        crops = np.stack([dataset.read_crop(key, crop_start(c, size), (size,) * 3) for c in centres[inside]])
        features = extract_features(encoder, crops[:, None], cfg.eval.batch_size, grid.location[inside])
        if cfg.eval.pool == "mean":
            rows.append(features.mean(axis=0))
        else:
            full = np.zeros((grid.size, features.shape[1]), dtype=features.dtype)
            full[inside] = features
            rows.append(full.ravel())
    return np.stack(rows)

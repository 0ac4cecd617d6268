"""`sslmed demo`: the whole pipeline on real MRI volumes, on this machine.

1. pack the MNI152 2009 T1 template and its grey/white-matter maps (shipped in the nilearn wheel);
2. pretrain an MAE on them through the DeepSpeed engine, export the encoder;
3. a downstream task that needs anatomical context: crops around the 300 Seitzman-2018 ROI centres
   (MNI coordinates, jittered), labelled cortex / subcortical nuclei / cerebellum. The intensity at a
   crop's centre barely separates these (all are grey matter), the surroundings do. Train and test are
   split by ROI, never by crop, so no region is on both sides;
4. linear probes at several label fractions and seeds: pretrained encoder vs the same architecture at
   random init vs an intensity-only baseline (mean of the central 3³ voxels). Table + PNG + JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sslmed.errors import DataError

# Seitzman-2018 anatomical codes → demo classes (left/right merged: the 2009 template is symmetric).
ROI_CLASSES = ("cortex", "subcortical", "cerebellum")
_SEITZMAN_CODE_TO_CLASS = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1, 7: 2}


@dataclass
class RoiSet:
    crops: np.ndarray  # (N, S, S, S) float32, normalised intensity
    labels: np.ndarray  # (N,) class index into ROI_CLASSES
    groups: np.ndarray  # (N,) ROI index: crops of one ROI never straddle train/test


def nilearn_data_dir() -> Path:
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data"


def seitzman_rois() -> tuple[np.ndarray, np.ndarray]:
    """(300, 3) MNI coordinates in mm and (300,) class indices into ROI_CLASSES."""
    folder = nilearn_data_dir()
    table = folder / "seitzman_2018_ROIs_300inVol_MNI_allInfo.txt"
    codes_file = folder / "seitzman_2018_ROIs_anatomicalLabels.txt"
    if not table.exists() or not codes_file.exists():
        raise DataError(f"the Seitzman-2018 ROI tables are missing from {folder}; reinstall nilearn")
    coords = np.loadtxt(table, skiprows=1, usecols=(0, 1, 2), dtype=np.float64)
    codes = [int(token) for token in codes_file.read_text().split()[1:]]
    if len(codes) != len(coords):
        raise DataError(f"{codes_file}: {len(codes)} labels for {len(coords)} ROIs")
    return coords, np.array([_SEITZMAN_CODE_TO_CLASS[c] for c in codes])


def roi_crops(dataset, key: str, size: int, per_roi: int, jitter_mm: float, seed: int) -> RoiSet:
    """Crops of `size`³ voxels around jittered ROI centres of the packed volume `key`."""
    coords, classes = seitzman_rois()
    meta = dataset.meta(key)
    world_to_voxel = np.linalg.inv(np.asarray(meta["affine"], dtype=np.float64))
    rng = np.random.default_rng(seed)
    crops, labels, groups = [], [], []
    for roi, (centre_mm, label) in enumerate(zip(coords, classes)):
        for _ in range(per_roi):
            jittered = centre_mm + rng.uniform(-jitter_mm, jitter_mm, size=3)
            voxel = world_to_voxel @ np.append(jittered, 1.0)
            start = np.round(voxel[:3]).astype(int) - size // 2
            crops.append(dataset.read_crop(key, start, (size, size, size)))
            labels.append(label)
            groups.append(roi)
    return RoiSet(np.stack(crops).astype(np.float32), np.array(labels), np.array(groups))


@torch.no_grad()
def encode(encoder: torch.nn.Module, crops: np.ndarray, batch: int = 64) -> np.ndarray:
    encoder.eval()
    features = [encoder(torch.from_numpy(crops[i:i + batch]).unsqueeze(1)).float().numpy()
                for i in range(0, len(crops), batch)]
    return np.concatenate(features)


def central_intensity(crops: np.ndarray) -> np.ndarray:
    """The intensity-only baseline's one feature: the mean of the central 3³ voxels."""
    c = crops.shape[-1] // 2
    return crops[:, c - 1:c + 2, c - 1:c + 2, c - 1:c + 2].mean(axis=(1, 2, 3))[:, None]

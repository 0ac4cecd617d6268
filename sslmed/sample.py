"""`sslmed sample RUN --n N`: new volumes from a trained contrastive autoencoder.

The run's encoder maps the centre crop of each volume of its training set (`data.path`) to its dense
code h; a Gaussian (mean and full covariance, with a small ridge so that fewer volumes than code
dimensions still give a valid one) is fitted on those codes; N codes drawn from it are decoded by the
run's decoder and written as NIfTI files (`sample-000.nii.gz`, …) with the training set's spacing.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from sslmed.data.sources import open_dataset
from sslmed.errors import ConfigError
from sslmed.train.checkpoint import load_run_method

RIDGE = 1e-4  # added to the covariance's diagonal, relative to its mean variance


def centre_crops(path: str, size: int, limit: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(N, 1, S, S, S) centre crops of up to `limit` volumes, and the dataset's voxel spacing (mm)."""
    dataset = open_dataset(path)
    crops = []
    for key in dataset.keys[:limit]:
        shape = dataset.volume(key).shape
        start = [(n - size) // 2 for n in shape]
        crops.append(dataset.read_crop(key, start, (size,) * 3))
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    spacing = manifest.get("preprocessing", {}).get("spacing") or (1.0, 1.0, 1.0)
    return np.stack(crops)[:, None], tuple(float(s) for s in spacing)


def fit_gaussian(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and lower Cholesky factor of the codes' covariance (+ ridge) in float64."""
    codes = codes.double()
    mean = codes.mean(dim=0)
    centred = codes - mean
    cov = centred.T @ centred / max(len(codes) - 1, 1)
    ridge = RIDGE * max(float(cov.diagonal().mean()), 1e-12)
    return mean, torch.linalg.cholesky(cov + ridge * torch.eye(len(mean), dtype=cov.dtype))


def draw(mean: torch.Tensor, factor: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    noise = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=mean.dtype)
    return (mean + noise @ factor.T).float()


@torch.no_grad()
def sample_run(run_dir: str, n: int, out: str, seed: int = 0, max_volumes: int = 512,
               trust: bool = False) -> list[Path]:
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    cfg, method = load_run_method(run_dir, trust)
    if not hasattr(method, "decode_code"):
        raise ConfigError(f"{run_dir}: sampling needs a method whose decoder reads a dense code "
                          f"(contrastive_ae); this run trained '{cfg.method.name}'")
    method.eval()
    crops, spacing = centre_crops(cfg.data.path, cfg.data.crop_size, max_volumes)
    if len(crops) < 2:
        raise ConfigError(f"{cfg.data.path}: fitting a Gaussian on codes needs at least 2 volumes")
    batches = np.array_split(crops, -(-len(crops) // 8))  # 8 crops at a time
    codes = torch.cat([method.encoder()(torch.from_numpy(batch)) for batch in batches])
    mean, factor = fit_gaussian(codes)
    volumes = method.decode_code(draw(mean, factor, n, seed)).numpy()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    written = []
    for i, volume in enumerate(volumes):
        path = folder / f"sample-{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume[0].astype(np.float32), affine), str(path))
        written.append(path)
    return written

"""`sslmed derive residual-targets RUN --data PACKED --out DIR`: a derived packed dataset whose samples
carry the residual method's soft target, computed once instead of on every crop.

RUN is a `residual` run (method.targets: on_the_fly) whose stage 1 has finished: its latest complete
checkpoint holds the frozen CAE that stage 2 reads, loaded through the checkpoint loaders
(weights_only). Every volume of PACKED (wds or zarr) is reconstructed by that CAE and turned into the
target by `models.residual_target.residual_target`, the function the on-the-fly method calls; DIR gets
the same samples (keys, stored arrays, metadata plus `target_dtype`) with a `target` array each, written
by `pack`'s own writers under its directory lock, in PACKED's format and codec. Its manifest's
`target` records the provenance: the source manifest's sha256, the CAE's weights sha256 and checkpoint,
the median kernel, the percentiles and the tiling.

The CAE's dense code fixes its input to crop_size³, so a volume is cut into non-overlapping crop_size³
tiles from its first voxel, the far side zero-padded (as the loader pads crops past a volume's edge),
and the tiles' reconstructions are put back side by side. Tiles go through the CAE `batch` at a time,
and the median filter (MONAI's, which holds kernel³ shifted copies of its input) runs on slabs of
`slab` slices, by default as many as keep those copies within `MEDIAN_BYTES`; so memory grows with the
volume (about ten float32 copies of it at the peak, the percentile sort's int64 indices included), not
with kernel³ copies of it. An interrupted derive leaves a valid dataset of the volumes written so far;
delete it and run again. The percentile rescale spans the whole volume, as the
paper's "per volume" says; the on-the-fly method rescales per crop (for the paper's sinus crops the two
are the same thing).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslmed.data.sources import PackedDataset, open_dataset
from sslmed.errors import ConfigError
from sslmed.io.format import MANIFEST, file_sha256
from sslmed.io.manifest import load_manifest
from sslmed.io.pack import Ledger, new_manifest, open_writer, progress_bar
from sslmed.lock import DirectoryLock
from sslmed.models.residual_target import residual_target

PERCENTILES = (1.0, 99.0)  # residual_target's defaults: the paper's 1st–99th percentile rescale
MEDIAN_BYTES = 512 * 2**20  # the median filter's kernel³ copies of one slab stay within this
TARGET_DTYPES = ("float16", "float32")


def derive_residual_targets(run: str | Path, data: str | Path, out: str | Path, *, batch: int = 8,
                            slab: int = 0, median_kernel: int | None = None, target_dtype: str = "float16",
                            shard_size: float = 512e6, chunk: int = 64, trust: bool = False) -> dict:
    """Write the derived dataset (see the module's docstring); returns {"samples", "out", "format"}."""
    out = Path(out)
    checks = [(not out.exists(), f"{out} already exists; derive into a new --out directory"),
              (batch >= 1, f"--batch must be at least 1, got {batch}"),
              (slab >= 0, f"--slab must be >= 0 (0: as memory allows), got {slab}"),
              (target_dtype in TARGET_DTYPES, f"--target-dtype must be float16 or float32: {target_dtype!r}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    source = load_manifest(data)  # one line when PACKED is missing or not a packed dataset
    dataset = open_dataset(data)
    cae, provenance = load_stage1_cae(run, trust)
    run_kernel = provenance.pop("median_kernel")
    kernel = run_kernel if median_kernel is None else median_kernel
    if kernel < 1 or kernel % 2 == 0:
        raise ConfigError(f"--median-kernel must be odd and >= 1, got {kernel}")
    manifest = new_manifest(source["format"], source["codec"], source["preprocessing"])
    manifest["target"] = {
        "kind": "residual", "dtype": target_dtype, "median_kernel": kernel, "percentiles": list(PERCENTILES),
        "tiling": f"non-overlapping {cae.crop_size}^3 tiles from the first voxel, far side zero-padded",
        "source": {"path": str(Path(data).resolve()), "manifest_sha256": file_sha256(Path(data) / MANIFEST),
                   "samples": source["samples"]},
        "cae": provenance}
    layout = {"fmt": source["format"], "codec": source["codec"], "shard_size": shard_size, "chunk": chunk}
    write_derived(dataset, out, manifest, layout,
                  lambda image: volume_target(cae, image, kernel, batch, slab).astype(target_dtype))
    print(f"sslmed derive: {manifest['samples']} samples with residual targets in {out}")
    return {"samples": manifest["samples"], "out": str(out), "format": source["format"]}


def write_derived(dataset: PackedDataset, out: Path, manifest: dict, layout: dict,
                  target_of: Callable[[np.ndarray], np.ndarray]) -> None:
    """Every sample of `dataset` as stored, with `target_of(its float volume)`, through pack's writer
    and ledger (manifest committed after each shard or few arrays) under `out`'s directory lock."""
    with DirectoryLock(out, "sslmed derive"):
        ledger = Ledger(out, manifest)
        writer = open_writer(out, layout, ledger.entries, ledger.commit)
        progress = progress_bar(len(dataset.keys), 0, "derive")
        try:
            for key in dataset.keys:
                volume = dataset.volume(key)
                target = target_of(volume.read())
                meta = {**dataset.meta(key), "target_dtype": str(target.dtype)}
                source_path = str(meta.get("source", key))
                writer.add(key, source_path, np.asarray(volume.array[...]), meta, target)
                ledger.record(Path(source_path), "ok", "", key)
                progress.update(1)
        finally:
            progress.close()
        writer.finish()
        ledger.commit()


def load_stage1_cae(run: str | Path, trust: bool = False) -> tuple[nn.Module, dict]:
    """The frozen stage-1 CAE of a finished-stage-1 `residual` run (eval mode) and its provenance."""
    from sslmed.train.checkpoint import complete_checkpoints, load_run_method, load_saved_config

    found = complete_checkpoints(Path(run))
    if not found:
        raise ConfigError(f"{run}: not a run with a complete checkpoint (need a `residual` run's RUN dir)")
    saved = load_saved_config(found[-1].path)
    if saved.method.name != "residual":
        raise ConfigError(f"{run}: a '{saved.method.name}' run; residual targets need a `residual` run's CAE")
    if saved.method.targets != "on_the_fly":
        raise ConfigError(f"{run}: trained on precomputed targets, so it has no CAE; give the run that "
                          "trained the CAE")
    cfg, method = load_run_method(run, trust)
    done, needed = int(method.steps_done), cfg.method.stage1_steps
    if done < needed:
        raise ConfigError(f"{run}: stage 1 is not finished (its latest checkpoint is at step {done} of the "
                          f"{needed} CAE steps); its frozen CAE is not trained yet")
    if cfg.model.in_channels != 1:
        raise ConfigError(f"{run}: the CAE reads {cfg.model.in_channels} channels; packed volumes have one")
    cae = method.frozen_cae.eval()
    provenance = {"run": str(Path(run).resolve()), "checkpoint": found[-1].tag, "step": found[-1].step,
                  "weights_sha256": weights_sha256(cae), "crop_size": cae.crop_size, "latent": cae.latent_dim,
                  "median_kernel": cfg.method.median_kernel}
    return cae, provenance


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the module's state (names, dtypes, shapes and values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{value.dtype}\0{list(value.shape)}\0".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def reconstruct_volume(cae: nn.Module, image: np.ndarray, batch: int = 8) -> np.ndarray:
    """The CAE's reconstruction of a whole (D, H, W) volume, tile by tile (see the module's docstring)."""
    size = cae.crop_size
    padded_shape = [-(-n // size) * size for n in image.shape]
    padded = np.zeros(padded_shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in image.shape)] = image
    out = np.empty_like(padded)
    tiles = [tuple(slice(a, a + size) for a in start)
             for start in itertools.product(*(range(0, n, size) for n in padded_shape))]
    for first in range(0, len(tiles), batch):
        group = tiles[first:first + batch]
        x = torch.from_numpy(np.stack([padded[tile] for tile in group])).unsqueeze(1)
        for tile, reconstruction in zip(group, cae(x)[:, 0].float().numpy(), strict=True):
            out[tile] = reconstruction
    return out[tuple(slice(0, n) for n in image.shape)]


def median_slab(shape: tuple[int, ...], kernel: int, budget: int = MEDIAN_BYTES) -> int:
    """Slices per median-filter pass such that its kernel³ float32 copies of the slab and its margin fit
    in `budget` bytes (at least one slice)."""
    per_slice = kernel**3 * int(np.prod(shape[1:])) * 4
    return max(1, budget // per_slice - 2 * (kernel // 2))


def volume_target(cae: nn.Module, image: np.ndarray, kernel: int, batch: int = 8, slab: int = 0
                  ) -> np.ndarray:
    """The residual target (float32, in [0, 1]) of one whole volume; `slab` 0: `median_slab`'s."""
    reconstruction = reconstruct_volume(cae, image, batch)
    slab = slab or median_slab(image.shape, kernel)
    as_batch = [torch.from_numpy(np.ascontiguousarray(a))[None, None] for a in (image, reconstruction)]
    low, high = PERCENTILES
    return residual_target(*as_batch, low=low, high=high, kernel_size=kernel, slab=slab)[0, 0].numpy()

"""Precomputed residual targets: `sslmed derive residual-targets` against an independent numpy/scipy
computation, target crops streamed in step with their image crops (spatial augmentation shared,
intensity augmentation never on the target), a precomputed run that resumes exactly, and the refusals."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from sslmed.cli import main
from sslmed.config import load_config
from sslmed.data import augment
from sslmed.data.pipeline import build_loader
from sslmed.data.sources import open_dataset
from sslmed.errors import DataError
from sslmed.io.manifest import inspect, load_manifest, verify
from sslmed.io.pack import Ledger, new_manifest, open_writer
from sslmed.lock import DirectoryLock
from sslmed.methods import build_method
from sslmed.models.residual_target import residual_target
from sslmed.train.checkpoint import load_run_method

SMALL = ["data.workers=0", "data.crops_per_volume=2", "data.shuffle_buffer=4", "train.micro_batch=2"]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Three phantoms (shapes that are no multiple of the CAE's 32³ tile) packed as wds and zarr, a
    residual run whose stage 1 has finished, and each format's derived dataset."""
    from sslmed.io.pack import pack
    from sslmed.io.synthetic import write_phantoms

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("residual-targets")
    paths = write_phantoms(root / "raw", 3, shape=(40, 36, 44), seed=5)
    tags = root / "tags.csv"
    tags.write_text("path,status\n" + "\n".join(f"{p.name},normal" for p in paths) + "\n")
    out = {"root": root, "run": root / "run"}
    for fmt in ("wds", "zarr"):
        pack(paths, root / f"packed-{fmt}", fmt=fmt, tags=tags)
    assert main(["pretrain", "residual-tiny", f"data.path={root / 'packed-wds'}", f"run.dir={out['run']}",
                 "train.steps=2", "method.stage1_steps=2", "checkpoint.every=2", *SMALL]) == 0
    for fmt, slab in (("wds", "7"), ("zarr", "0")):  # slabs of 7 slices; as memory allows (all 40)
        assert main(["derive", "residual-targets", str(out["run"]), "--data", str(root / f"packed-{fmt}"),
                     "--out", str(root / f"derived-{fmt}"), "--slab", slab, "--batch", "3"]) == 0
    return out


def reference_target(image: np.ndarray, cae: torch.nn.Module, kernel: int) -> np.ndarray:
    """numpy/scipy: the CAE on zero-padded 32³ tiles from the origin, then |x − CAE(x)|, 1–99 %
    percentile rescale to [0, 1] and a median filter with edge repetition."""
    size = cae.crop_size
    padded = np.pad(image, [(0, -n % size) for n in image.shape])
    reconstruction = np.zeros_like(padded)
    for corner in itertools.product(*(range(0, n, size) for n in padded.shape)):
        box = tuple(slice(c, c + size) for c in corner)
        with torch.no_grad():
            reconstruction[box] = cae(torch.from_numpy(padded[box])[None, None])[0, 0].numpy()
    residual = np.abs(image.astype(np.float64) - reconstruction[tuple(slice(0, n) for n in image.shape)])
    low, high = np.percentile(residual, [1, 99])
    scaled = np.clip((residual - low) / (high - low), 0.0, 1.0)
    return scipy.ndimage.median_filter(scaled, size=kernel, mode="nearest")


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_derived_target_equals_numpy_scipy_and_the_dataset_verifies(setup, fmt):
    root = setup["root"]
    derived, source = root / f"derived-{fmt}", root / f"packed-{fmt}"
    assert verify(derived) == []
    manifest = load_manifest(derived)
    info = manifest["target"]
    kernel = info["median_kernel"]
    assert info["kind"] == "residual" and kernel == 3  # residual-tiny's kernel
    assert info["percentiles"] == [1.0, 99.0]
    source_digest = hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
    assert info["source"]["manifest_sha256"] == source_digest
    assert info["cae"]["step"] == 2 and len(info["cae"]["weights_sha256"]) == 64
    assert "\ntarget      residual (float16, median kernel 3" in inspect(derived)
    cae = load_run_method(setup["run"])[1].frozen_cae.eval()
    original, copy = open_dataset(source), open_dataset(derived)
    assert copy.keys == original.keys
    for key in original.keys:
        meta = copy.meta(key)
        assert meta == {**original.meta(key), "target_dtype": "float16"}
        image = original.read(key)
        assert np.array_equal(copy.read(key), image)
        stored = np.asarray(copy.volume(key).target[...])
        assert stored.dtype == np.float16 and stored.shape == image.shape
        expected = reference_target(image, cae, kernel)
        assert 0.0 < expected.mean() < 1.0  # not a flat target, which would match anything flat
        np.testing.assert_allclose(stored.astype(np.float64), expected, atol=1e-3)  # float16 storage


def test_the_slabbed_median_filter_equals_the_whole_volume_filter():
    torch.manual_seed(0)
    image, reconstruction = torch.rand(2, 1, 19, 12, 10), torch.rand(2, 1, 19, 12, 10)
    whole = residual_target(image, reconstruction, kernel_size=5)
    for slab in (1, 4, 7, 18):
        assert torch.equal(residual_target(image, reconstruction, kernel_size=5, slab=slab), whole)


def test_verify_names_a_damaged_target(setup, tmp_path):
    damaged = tmp_path / "derived"
    shutil.copytree(setup["root"] / "derived-zarr", damaged)
    entry = load_manifest(damaged)["arrays"][0]
    chunk = damaged / entry["target"]["path"] / entry["target"]["files"][-1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify(damaged)
    assert problems and all(entry["target"]["path"] in p or entry["path"] in p for p in problems)


def write_half_image(packed: Path, out: Path, fmt: str = "wds", without_target: str = "") -> Path:
    """A dataset whose target is exactly half the image (float32: bilinear resampling and flips commute
    with a power-of-two scale bit for bit), written by pack's own writer; `without_target` names a
    sample written without one."""
    source = open_dataset(packed)
    manifest = new_manifest(fmt, "zstd", load_manifest(packed)["preprocessing"])
    manifest["target"] = {"kind": "half-image"}
    with DirectoryLock(out, "test"):
        ledger = Ledger(out, manifest)
        writer = open_writer(out, {"fmt": fmt, "codec": "zstd", "shard_size": 1e9, "chunk": 64},
                             ledger.entries, ledger.commit)
        for key in source.keys:
            volume = source.volume(key)
            half = None if key == without_target else (volume.read() * 0.5).astype(np.float32)
            meta = {**source.meta(key), "target_dtype": "float32"}
            writer.add(key, key, np.asarray(volume.array), meta, half)
        writer.finish()
        ledger.commit()
    return out


@pytest.fixture(scope="module")
def half_image(setup, tmp_path_factory) -> Path:
    out = write_half_image(setup["root"] / "packed-wds", tmp_path_factory.mktemp("half") / "derived")
    assert verify(out) == []
    return out


def streamed(data: Path, augment_on: str, families: str, steps: int = 3, *extra: str) -> list[dict]:
    cfg = load_config("residual-tiny", [f"data.path={data}", "method.targets=precomputed", *SMALL,
                                        "data.augment=true", f"data.augment_on={augment_on}",
                                        f"data.augment_families={families}", "data.crops_per_volume=3",
                                        *extra])
    loader = build_loader(cfg)
    out = []
    for step, batch in zip(range(steps), loader, strict=False):
        out.append(augment.prepare(batch, cfg, rank=0, step=step, device="cpu"))
    loader.close()
    return out


@pytest.mark.parametrize("augment_on", ["device", "loader"])
def test_target_crops_follow_the_image_crops_through_spatial_augmentation_only(setup, half_image, augment_on):
    spatial = streamed(half_image, augment_on, "[flip,affine]")
    everything = streamed(half_image, augment_on, "[flip,affine,intensity,gamma,bias_field,blur,noise]")
    plain = streamed(setup["root"] / "packed-wds", augment_on, "[flip,affine,intensity,gamma,bias_field,blur,"
                     "noise]")
    unaugmented = streamed(half_image, augment_on, "[]")
    moved = 0
    for s, e, p, u in zip(spatial, everything, plain, unaugmented, strict=True):
        assert s["target"].shape == s["image"].shape and s["target"].dtype == torch.float32
        # the same box and the same flips / affine: the target is still half its image, crop by crop
        assert torch.equal(s["target"], 0.5 * s["image"])
        moved += int((s["image"] != u["image"]).flatten(1).any(1).sum())
        # intensity augmentation changes the image and leaves the target as the spatial-only run has it
        assert torch.equal(e["target"], s["target"]) and not torch.equal(e["image"], s["image"])
        # carrying a target changes nothing of the image (the plain set streams the same crops)
        assert torch.equal(e["image"], p["image"]) and "target" not in p
    assert moved > 0  # some crops were flipped or resampled: the check above could fail


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_precomputed_run_trains_without_a_cae_and_resumes_exactly(setup, tmp_path):
    run = tmp_path / "run"
    command = ["pretrain", "residual-tiny", f"data.path={setup['root'] / 'derived-wds'}", f"run.dir={run}",
               "method.targets=precomputed", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5",
               *SMALL]
    assert main(command) == 0
    reference = losses(run)
    assert len(reference) == 4 and all(np.isfinite(reference))
    _, method = load_run_method(run)
    assert not hasattr(method, "cae") and not hasattr(method, "frozen_cae") and method.stage == 2
    shutil.rmtree(run / "checkpoints" / "step_4")
    assert main(command) == 0  # resumes at step 2: steps 3 and 4 again, the same crops and targets
    assert losses(run) == reference


def test_refusals_are_one_line(setup, tmp_path, capsys):
    root = setup["root"]
    pool = root / "packed-wds"

    def refused(argv: list[str], words: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("sslmed: error:") and err.count("\n") == 1 and words in err, err

    def derive(run: Path, data: Path = pool, out: Path | None = None) -> list[str]:
        out = out or tmp_path / "o"
        return ["derive", "residual-targets", str(run), "--data", str(data), "--out", str(out)]

    def pretrained(config: str, name: str, *extra: str) -> Path:
        run = tmp_path / name
        assert main(["pretrain", config, f"data.path={pool}", f"run.dir={run}", "train.steps=1",
                     "checkpoint.every=1", *extra, *SMALL]) == 0
        capsys.readouterr()
        return run

    refused(derive(setup["run"], out=root / "derived-wds"), "already exists")
    refused(derive(setup["run"], data=tmp_path / "absent"), "absent")
    refused(derive(tmp_path), "not a run with a complete checkpoint")
    refused(derive(pretrained("mae-tiny", "mae", "data.crop_size=16")), "a 'mae' run")
    refused(derive(pretrained("residual-tiny", "early", "method.stage1_steps=5")), "stage 1 is not finished")
    assert not (tmp_path / "o").exists()
    refused(["pretrain", "residual-tiny", f"data.path={pool}", f"run.dir={tmp_path / 'r'}",
             "method.targets=precomputed", *SMALL], "needs a dataset of residual targets")


def test_precomputed_and_on_the_fly_give_the_same_loss_for_the_same_target():
    common = ["data.crop_size=32", "method.stage1_steps=1"]
    on_the_fly = build_method(load_config("residual-tiny", common))
    precomputed = build_method(load_config("residual-tiny", [*common, "method.targets=precomputed"]))
    precomputed.unet.load_state_dict(on_the_fly.unet.state_dict())
    on_the_fly.on_step_end(0, 1)  # stage 2
    image = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = residual_target(image, on_the_fly.frozen_cae.eval()(image), kernel_size=3)
    assert torch.equal(precomputed({"image": image, "target": target})[0], on_the_fly({"image": image})[0])
    with pytest.raises(DataError, match="reads each crop's target"):
        precomputed({"image": image})


def test_targets_stream_from_a_shard_url_as_from_the_directory(half_image):
    url = f"data.shard_url={half_image}/{{shard}}"
    for local, remote in zip(streamed(half_image, "device", "[flip,affine]"),
                             streamed(half_image, "device", "[flip,affine]", 3, url), strict=True):
        assert torch.equal(local["target"], remote["target"]) and torch.equal(local["image"], remote["image"])


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_a_sample_without_its_target_is_a_counted_skip(setup, tmp_path, fmt):
    packed = setup["root"] / f"packed-{fmt}"
    missing = open_dataset(packed).keys[0]
    out = write_half_image(packed, tmp_path / "derived", fmt, without_target=missing)
    assert any("no target" in problem for problem in verify(out))
    cfg = load_config("residual-tiny", [f"data.path={out}", "method.targets=precomputed", *SMALL])
    loader = build_loader(cfg)
    batches = [batch for _, batch in zip(range(4), loader, strict=False)]
    assert loader.skipped["samples"] >= 1
    assert all("target" in batch and missing not in batch["key"] for batch in batches)
    loader.close()

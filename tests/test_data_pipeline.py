"""Streaming loader: batch layout, locations, exact resume (in-process and with 2 workers), tag filters."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from sslmed.config import Config
from sslmed.data.augment import to_float
from sslmed.data.pipeline import build_loader
from sslmed.data.sources import open_dataset
from sslmed.errors import DataError
from sslmed.io.pack import pack
from sslmed.io.synthetic import write_phantoms

CROP = 8


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    inputs = write_phantoms(root / "in", 5, shape=(20, 16, 12), seed=11)
    with open(root / "tags.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "status"])
        writer.writerows([p.name, "normal" if i % 2 == 0 else "abnormal"] for i, p in enumerate(inputs))
    pack(inputs, root / "wds", fmt="wds", shard_size=1, tags=root / "tags.csv")
    pack(inputs, root / "zarr", fmt="zarr", chunk=8)
    return {"wds": root / "wds", "zarr": root / "zarr"}


def config(path: Path, **data) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.workers = str(path), CROP, 0
    cfg.data.crops_per_volume, cfg.data.shuffle_buffer, cfg.train.micro_batch = 3, 5, 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_batch_layout_and_locations(packed, fmt):
    cfg = config(packed[fmt], views=2, neighbour=True, neighbour_shift=3, augment=False)
    dataset = open_dataset(packed[fmt])
    for stored in take(build_loader(cfg, 0, 1), 4):
        b = cfg.train.micro_batch
        assert stored["image"].dtype == torch.int16  # as packed; converted on the training device
        batch = to_float(stored)
        for name in ("image", "image2", "neighbour"):
            assert batch[name].shape == (b, 1, CROP, CROP, CROP) and batch[name].dtype == torch.float32
        assert batch["location"].shape == batch["neighbour_location"].shape == (b, 3)
        assert len(batch["key"]) == len(batch["tags"]) == b
        for i, key in enumerate(batch["key"]):
            shape = np.array(dataset.meta(key)["shape"])
            start, near = batch["start"][i].numpy(), batch["neighbour_start"][i].numpy()
            # the crop centre scaled by the volume's extent to [-1, 1]
            np.testing.assert_allclose(batch["location"][i].numpy(), 2 * (start + CROP / 2) / shape - 1,
                                       rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(batch["neighbour_location"][i].numpy(),
                                       2 * (near + CROP / 2) / shape - 1, rtol=1e-6, atol=1e-6)
            assert np.abs(near - start).max() <= 3
            # without augmentation each view is exactly the random-access crop at its start
            np.testing.assert_array_equal(batch["image"][i, 0].numpy(),
                                          dataset.read_crop(key, start, [CROP] * 3))
            np.testing.assert_array_equal(batch["neighbour"][i, 0].numpy(),
                                          dataset.read_crop(key, near, [CROP] * 3))


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_stored_crops_convert_to_the_float32_crops_also_where_padded(packed, fmt):
    cfg = config(packed[fmt], crop_size=16, augment=False)  # volumes are 20 × 16 × 12: zero padding
    dataset = open_dataset(packed[fmt])
    for batch in map(to_float, take(build_loader(cfg, 0, 1), 3)):
        for i, key in enumerate(batch["key"]):
            expected = dataset.read_crop(key, batch["start"][i].numpy(), [16] * 3)
            np.testing.assert_array_equal(batch["image"][i, 0].numpy(), expected)


def test_one_epoch_covers_every_volume_once(packed):
    cfg = config(packed["wds"], crops_per_volume=1, shuffle_buffer=1, augment=False)
    cfg.train.micro_batch = 1
    loader = build_loader(cfg, 0, 1)
    keys = [next(loader)["key"][0] for _ in range(5)]
    assert sorted(keys) == open_dataset(packed["wds"]).keys and loader.epoch == 0
    next(loader)
    assert loader.epoch == 1


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        for name in ("start", "neighbour_start", "location", "image", "image2", "neighbour"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("fmt, workers, stop, wanted, on", [
    ("wds", 0, 11, {}, "device"),  # resumes in epoch 1 (22 crops, 15 per epoch): from the epoch bookmark
    ("zarr", 0, 4, {}, "loader"),  # MONAI's per-crop augmentation in the loader
    ("wds", 0, 6, {"status": "normal"}, "device"),  # filtered: volumes are passed by reading metadata only
    ("wds", 2, 5, {}, "loader"),  # two workers: the restarted DataLoader's worker 0 continues stream 1
])
def test_resume_continues_at_exactly_the_same_sample(packed, fmt, workers, stop, wanted, on):
    # 3 crops per volume, blocks of 5, batches of 2: stopping points fall mid-volume and mid-block,
    # and 14 batches (28 crops) from 5 volumes cross epoch boundaries
    cfg = config(packed[fmt], workers=workers, views=2, neighbour=True, augment=True, filter_tags=wanted,
                 augment_on=on)
    total = 14
    straight = take(build_loader(cfg, 0, 1), total)
    first = build_loader(cfg, 0, 1)
    head = take(first, stop)
    state = first.state_dict()
    first.close()
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    tail = take(resumed, total - stop)
    assert_same(straight, head + tail)
    assert resumed.epoch >= 1
    if stop == 11:
        assert state["marks"]["0"][0] == 1, "the bookmark skips whole epochs"


def test_resume_refuses_a_different_layout(packed):
    loader = build_loader(config(packed["wds"]), 0, 1)
    next(loader)
    state = loader.state_dict()
    other = build_loader(config(packed["wds"], crops_per_volume=2), 0, 1)
    with pytest.raises(DataError, match="crops_per_volume"):
        other.load_state_dict(state)


def test_filter_tags_keeps_only_matching_volumes(packed):
    cfg = config(packed["wds"], filter_tags={"status": "normal"}, augment=False)
    batches = take(build_loader(cfg, 0, 1), 6)
    tags = [t for b in batches for t in b["tags"]]
    assert {t["status"] for t in tags} == {"normal"}
    assert len({k for b in batches for k in b["key"]}) == 3
    cfg = config(packed["wds"], filter_tags={"status": "absent"})
    with pytest.raises(DataError, match="filter_tags"):
        next(build_loader(cfg, 0, 1))

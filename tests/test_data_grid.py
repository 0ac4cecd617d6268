"""Atlas-grid sampling: one grid point per batch across registered subjects, the same anatomy in each,
exact resume, grid points outside a subject counted, a dataset packed without an atlas refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sslmed.config import Config
from sslmed.data.augment import VIEWS, prepare, to_float
from sslmed.data.grid import build_grid, grid_size
from sslmed.data.pipeline import build_loader
from sslmed.data.sources import open_dataset
from sslmed.errors import DataError
from sslmed.io.pack import pack
from sslmed.io.synthetic import write_phantoms

CROP = 8
STEP = 16.0  # mm: a few dozen grid points in the 80 mm phantom head (tests/atlas_inputs.py)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """Phantoms packed without an atlas."""
    folder = tmp_path_factory.mktemp("plain")
    pack(write_phantoms(folder / "in", 2, shape=(12, 12, 12), seed=3), folder / "wds", fmt="wds")
    return folder / "wds"


def config(path: Path, **data) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.workers = str(path), CROP, 0
    cfg.data.sampling, cfg.data.grid_step, cfg.train.micro_batch = "atlas_grid", STEP, 4
    cfg.data.views, cfg.data.neighbour, cfg.data.augment = 2, True, False
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def template_world(key: str, centre_voxel: np.ndarray, dataset, known) -> np.ndarray:
    """A subject's voxel → template world through the known map (not the stored registration)."""
    meta = dataset.meta(key)
    world = np.asarray(meta["affine"]) @ np.append(centre_voxel, 1.0)
    return (np.linalg.inv(known[tuple(meta["shape"])]) @ world)[:3]


def test_every_batch_holds_one_grid_point_the_same_anatomy_in_each_subject(registered):
    cfg = config(registered["zarr"])
    dataset = open_dataset(registered["zarr"])
    grid = build_grid(str(registered["template"]), STEP)
    assert grid_size(cfg) == grid.size > 8
    loader = build_loader(cfg, 0, 1)
    seen = set()
    for _ in range(grid.size):
        batch = to_float(next(loader))
        point = batch["grid_point"][0]
        assert isinstance(batch["grid_point"], list) and set(batch["grid_point"]) == {point}
        assert len(set(batch["key"])) == len(batch["key"]) >= 3  # one crop per subject
        seen.add(point)
        b = len(batch["key"])
        for name in ("location", "neighbour_location", "neighbour2_location"):
            assert batch[name].shape == (b, 3) and batch[name].dtype == torch.float32
            assert torch.all(batch[name] == batch[name][0]) and batch[name].abs().max() <= 1
        for name in ("image", "image2", "neighbour", "neighbour2"):
            assert batch[name].shape == (b, 1, CROP, CROP, CROP) and batch[name].dtype == torch.float32
        assert torch.equal(batch["image"], batch["image2"])  # without augmentation: the same patch
        # the location is the grid point's template position scaled by the template's extent
        low, high = np.asarray(dataset.meta("template")["atlas_bounds"])
        scaled = 2 * (grid.world[point] - low) / (high - low) - 1
        np.testing.assert_allclose(batch["location"][0].numpy(), scaled, atol=1e-6)
        # the two neighbours are the nearest grid points: one grid step away on this regular grid
        for name in ("neighbour_location", "neighbour2_location"):
            other = np.flatnonzero(np.all(np.isclose(grid.location, batch[name][0].numpy()), axis=1))
            assert len(other) == 1 and other[0] != point
            assert np.linalg.norm(grid.world[other[0]] - grid.world[point]) == pytest.approx(STEP)
        # each crop is centred, in its subject, on the same template place (within half a voxel)
        for i, key in enumerate(batch["key"]):
            centre = batch["start"][i].numpy() + (CROP - 1) / 2
            place = template_world(key, centre, dataset, registered["known"])
            assert np.linalg.norm(place - grid.world[point]) <= 0.5 * np.sqrt(3) * 2.0 + 1e-6
        # and looks like the template there: its mean is closer to the template's crop there than to
        # the template's crop one grid step away (subjects that see the whole head: the same normalisation)
        if "template" in batch["key"]:
            at = batch["key"].index("template")
            here, step_away = batch["image"][at].mean(), batch["neighbour"][at].mean()
            for i, key in enumerate(batch["key"]):
                if key in ("near", "far") and abs(here - step_away) > 0.05:
                    mean = batch["image"][i].mean()
                    assert abs(mean - here) < abs(mean - step_away), (key, point)
    assert len(seen) == grid.size  # the first round visits every grid point once


def test_grid_points_outside_a_subject_are_counted_and_left_out(registered):
    cfg = config(registered["zarr"])
    dataset = open_dataset(registered["zarr"])
    grid = build_grid(str(registered["template"]), STEP)
    # independently: the narrow subject's voxel of each grid point, through the known map
    meta = dataset.meta("narrow")
    to_voxel = np.linalg.inv(np.asarray(meta["affine"])) @ registered["known"][tuple(meta["shape"])]
    voxels = (to_voxel @ np.c_[grid.world, np.ones(grid.size)].T)[:3].T
    outside = ~np.all((voxels >= -0.5) & (voxels <= np.asarray(meta["shape"]) - 0.5), axis=1)
    assert 0 < outside.sum() < grid.size
    loader = build_loader(cfg, 0, 1)
    for _ in range(grid.size):
        batch = next(loader)
        assert ("narrow" in batch["key"]) == (not outside[batch["grid_point"][0]])
    assert loader.skipped == {"shards": 0, "samples": 0, "grid_points": int(outside.sum())}


def test_a_point_only_one_subject_of_the_round_holds_is_counted_not_batched_alone(registered):
    cfg = config(registered["zarr"])
    cfg.train.micro_batch = 2  # rounds of two subjects: the narrow one and a partner
    loader = build_loader(cfg, 0, 1)
    sizes = [len(next(loader)["key"]) for _ in range(60)]
    assert min(sizes) == 2  # never a batch of one crop (no second subject to contrast, no batch norm)
    # each point outside the narrow subject is counted for it, and again for its partner's lone crop
    assert loader.skipped["grid_points"] % 2 == 0 and loader.skipped["grid_points"] > 0


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"] and x["grid_point"] == y["grid_point"]
        for name in ("start", "location", "image", "image2", "neighbour", "neighbour2", "neighbour2_start"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("workers, stop, rounds, on", [
    (0, 32, 2, "device"),  # batches of 2 subjects: 2 rounds per epoch of 4 volumes; crosses an epoch
    (2, 23, 2, "device"),  # two workers: the restarted DataLoader's worker 0 continues stream 1
    (0, 4, 0, "loader"),  # MONAI's per-crop augmentation, seeded by the crop's place in the stream
])
def test_the_grid_stream_resumes_at_exactly_the_same_batch(registered, workers, stop, rounds, on):
    cfg = config(registered["zarr"], workers=workers, augment=True, augment_on=on)
    cfg.train.micro_batch = 2
    total = rounds * grid_size(cfg) + 7
    straight = [next(loader) for loader in [build_loader(cfg, 0, 1)] for _ in range(total)]
    first = build_loader(cfg, 0, 1)
    head = [next(first) for _ in range(stop)]
    state = first.state_dict()
    first.close()
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert_same(straight, head + [next(resumed) for _ in range(total - stop)])
    if workers == 0 and rounds == 2:
        assert resumed.epoch == 1 and state["marks"]["0"][2] == 2, "the bookmark is the second round"


def test_a_dataset_packed_without_an_atlas_is_refused_in_one_line(plain):
    cfg = config(plain)
    for attempt in (lambda: build_loader(cfg, 0, 1), lambda: grid_size(cfg)):
        with pytest.raises(DataError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message and "packed without an atlas" in message
        assert "sslmed pack --atlas" in message


def test_device_augmentation_converts_and_augments_the_second_neighbour(registered):
    cfg = config(registered["zarr"], augment=True, augment_on="device")
    assert "neighbour2" in VIEWS
    batch = next(build_loader(cfg, 0, 1))
    plain = to_float(batch)
    augmented = prepare(batch, cfg, rank=0, step=0, device="cpu")
    assert "neighbour2_valid" not in augmented and augmented["neighbour2"].dtype == torch.float32
    assert not torch.equal(augmented["neighbour2"], plain["neighbour2"])

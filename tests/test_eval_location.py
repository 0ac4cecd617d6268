"""Locations downstream: an exported location-conditioned encoder records that it needs a location, its
features depend on it, a missing or out-of-range one is refused; probes pass each sample's location
end to end; patient pooling over the atlas grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sslmed
from sslmed.config import load_config
from sslmed.data.grid import build_grid
from sslmed.data.sources import open_dataset
from sslmed.errors import DataError
from sslmed.eval import probe
from sslmed.eval.encoders import build_encoder
from sslmed.eval.pooling import pooled_features
from sslmed.models import CondCNN3D, ViT3D
from sslmed.train import checkpoint as ckpt

SIZE = 16


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def located_encoder(registered, tmp_path_factory) -> Path:
    """A CondCNN3D at random init exported from a run on atlas-packed data."""
    torch.manual_seed(0)
    module = CondCNN3D(dim=4, depth=1, experts=4).eval()
    cfg = load_config(None, [f"data.path={registered['zarr']}", f"data.crop_size={SIZE}"])
    return ckpt.export_encoder(module, tmp_path_factory.mktemp("enc") / "enc.safetensors",
                               ckpt.encoder_meta(cfg))


def test_exported_located_encoder_needs_its_location_and_its_features_depend_on_it(located_encoder, tmp_path):
    info = json.loads(located_encoder.with_suffix(".json").read_text())
    assert info["needs_location"] is True and info["location_coordinates"] == "atlas"
    assert info["location_range"] == [-1, 1] and info["atlas_template"] == "template.nii.gz"
    encoder = sslmed.load_encoder(located_encoder)
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    here, there = torch.tensor([[-0.8, 0.1, 0.5]] * 2), torch.tensor([[0.7, -0.6, -0.2]] * 2)
    with torch.no_grad():
        a, b = encoder(x, here), encoder(x, location=there)
        assert ((a - b).norm(dim=1) / a.norm(dim=1)).min() > 0.01  # a different place, other features
        assert torch.equal(encoder(x, here), a)
        with pytest.raises(DataError, match="location-conditioned: pass each crop's location") as error:
            encoder(x)
        assert "\n" not in str(error.value)
        with pytest.raises(DataError, match=r"location outside \[-1, 1\]"):
            encoder(x, here * 1.5)
        with pytest.raises(DataError, match=r"must be \(B, 3\)"):
            encoder(x, here[:1])
    # an encoder that takes no location says so, and ignores one
    vit = ViT3D(patch_size=8, dim=24, depth=1, heads=2).eval()
    path = ckpt.export_encoder(vit, tmp_path / "vit.safetensors", {})
    assert json.loads(path.with_suffix(".json").read_text())["needs_location"] is False
    plain = sslmed.load_encoder(path)
    with torch.no_grad():
        assert torch.equal(plain(x, here), plain(x))
    assert type(plain) is ViT3D  # the module itself: state dict, type and training forward unchanged


def location_folder(root: Path, with_locations: bool = True) -> Path:
    """Identical crops whose class is only where they are: the left (x < 0) or the right half."""
    root.mkdir(parents=True, exist_ok=True)
    crop = np.random.default_rng(0).random((SIZE, SIZE, SIZE)).astype(np.float32)
    rows = []
    rng = np.random.default_rng(1)
    for i in range(40):
        x = rng.uniform(0.2, 0.9) * (1 if i % 2 else -1)
        name = f"crop{i}.npy"
        np.save(root / name, crop)
        rows.append([name, "right" if x > 0 else "left", f"{x:.4f}", f"{rng.uniform(-1, 1):.4f}", "0.1"])
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["path", "label", "location_x", "location_y", "location_z"]
        writer.writerows([header[:2] if not with_locations else header]
                         + [r[:2] if not with_locations else r for r in rows])
    return root


def probe_config(tmp_path: Path, encoder: Path | str, data: Path, *extra: str):
    return load_config(None, [f"run.dir={tmp_path / 'probe'}", f"eval.encoder={encoder}",
                              f"eval.data={data}", f"data.crop_size={SIZE}", "eval.label_fractions=[1.0]",
                              "eval.seeds=[0]", *extra])


def test_a_probe_passes_each_samples_location_end_to_end(located_encoder, tmp_path, monkeypatch):
    folder = location_folder(tmp_path / "folder")
    with open(folder / "labels.csv") as handle:
        expected = np.array([[float(r[c]) for c in ("location_x", "location_y", "location_z")]
                             for r in csv.DictReader(handle)], dtype=np.float32)
    seen = []

    def recording(cfg, seed=0):
        encoder = build_encoder(cfg, seed)
        encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["location"].clone()),
                                          with_kwargs=True)
        return encoder

    monkeypatch.setattr(probe, "build_encoder", recording)
    report = probe.finetune(probe_config(tmp_path, located_encoder, folder))
    np.testing.assert_array_equal(torch.cat(seen).numpy(), expected)  # every sample, in order
    # the crops are identical: only their locations tell left from right, and the probe finds it
    assert report["summary"]["1.0"]["balanced_accuracy"]["mean"] == pytest.approx(1.0)
    # fine-tuning end to end also hands each batch its locations
    seen.clear()
    probe.finetune(probe_config(tmp_path, located_encoder, folder, "eval.mode=finetune", "eval.epochs=1",
                                "eval.batch_size=16"))
    assert len(seen) > 2 and all(s.shape[1] == 3 and s.abs().max() <= 1 for s in seen)


def test_a_located_encoder_refuses_data_without_locations_in_one_line(located_encoder, tmp_path):
    folder = location_folder(tmp_path / "no-locations", with_locations=False)
    with pytest.raises(DataError) as error:
        probe.finetune(probe_config(tmp_path, located_encoder, folder))
    message = str(error.value)
    assert "\n" not in message and "location-conditioned" in message and "eval.location_columns" in message


def test_patient_pooling_encodes_each_subject_at_every_grid_point_inside_it(registered, located_encoder):
    cfg = load_config(None, [f"eval.data={registered['zarr']}", f"data.crop_size={SIZE}", "data.grid_step=16",
                             "eval.pool=mean"])
    encoder = sslmed.load_encoder(located_encoder)
    dataset = open_dataset(registered["zarr"])
    keys = ["template", "narrow"]
    mean = pooled_features(cfg, encoder, keys)
    cfg.eval.pool = "concat"
    concat = pooled_features(cfg, encoder, keys)
    grid = build_grid(str(registered["template"]), 16.0)
    width = encoder.feature_dim
    assert mean.shape == (2, width) and concat.shape == (2, grid.size * width)
    for row, key in enumerate(keys):
        # independently: each grid point through the known map into the subject, encoded one by one
        meta = dataset.meta(key)
        to_voxel = np.linalg.inv(np.asarray(meta["affine"])) @ registered["known"][tuple(meta["shape"])]
        per_point = concat[row].reshape(grid.size, width)
        expected = []
        for p in range(grid.size):
            centre = (to_voxel @ np.append(grid.world[p], 1.0))[:3]
            if not np.all((centre >= -0.5) & (centre <= np.asarray(meta["shape"]) - 0.5)):
                assert not per_point[p].any()  # outside the subject: zeros in the concatenation
                continue
            start = np.round(centre - (SIZE - 1) / 2).astype(int)
            crop = torch.from_numpy(dataset.read_crop(key, start, (SIZE,) * 3))[None, None]
            with torch.no_grad():
                expected.append(encoder(crop, torch.from_numpy(grid.location[p:p + 1])).numpy()[0])
            np.testing.assert_allclose(per_point[p], expected[-1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mean[row], np.mean(expected, axis=0), rtol=1e-4, atol=1e-5)
    assert len(expected) < grid.size  # the narrow subject misses part of the grid

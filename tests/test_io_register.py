"""Affine registration to an atlas (SimpleITK) on a real T1 head, through `sslmed pack --atlas`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslmed.bench.register import known_move
from sslmed.data.sources import open_dataset
from sslmed.data.stages import location
from sslmed.errors import VolumeError
from sslmed.io.pack import pack
from sslmed.io.register import check_plausible, to_sitk
from sslmed.io.synthetic import itk_t1_path


@pytest.fixture(scope="module")
def template_and_moved(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The real T1 as the template, and the same head moved by `known_move` onto a new 2 mm grid."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("register")
    source = nib.load(str(itk_t1_path()))
    template = folder / "template.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj, dtype=np.float32), source.affine), str(template))
    fixed = to_sitk(np.asarray(source.dataobj, dtype=np.float32), source.affine)
    centre = (source.affine @ np.append((np.asarray(source.shape) - 1) / 2, 1.0))[:3]
    grid_shape = np.array([140, 140, 110])
    moved_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moved_affine[:3, 3] = centre - 2.0 * (grid_shape - 1) / 2  # a grid centred on the head
    grid = to_sitk(np.zeros(grid_shape, np.float32), moved_affine)
    transform = known_move(centre)
    # Resample pulls each output point p from the input at map(p): moved(p) = template(T⁻¹ p)
    inverse = np.linalg.inv(transform)
    pull = sitk.AffineTransform(inverse[:3, :3].ravel().tolist(), inverse[:3, 3].tolist())
    moved = sitk.GetArrayFromImage(sitk.Resample(fixed, grid, pull, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    moved_path = folder / "moved.nii.gz"
    nib.save(nib.Nifti1Image(moved.astype(np.float32), moved_affine), str(moved_path))
    return template, moved_path, transform


@pytest.fixture(scope="module")
def packed_with_atlas(template_and_moved, tmp_path_factory) -> Path:
    template, moved, _ = template_and_moved
    out = tmp_path_factory.mktemp("packed-atlas") / "zarr"
    pack([template, moved], out, fmt="zarr", modality="mr", atlas=template)
    return out


def landmarks(shape) -> np.ndarray:
    """Voxel positions spread through the head: the centre and 8 points half-way to the corners."""
    centre = (np.asarray(shape) - 1) / 2
    offsets = np.array(np.meshgrid(*[(-0.25, 0.25)] * 3, indexing="ij")).reshape(3, -1).T
    return np.vstack([centre, centre + offsets * np.asarray(shape)])


def test_registration_recovers_a_known_affine_within_1_5_mm_at_landmarks(packed_with_atlas,
                                                                          template_and_moved):
    _, _, transform = template_and_moved
    dataset = open_dataset(packed_with_atlas)
    meta = dataset.meta("moved")
    assert meta["atlas_metric"] < -0.15 and meta["atlas_template"] == "template.nii.gz"
    stored_to_world = np.asarray(meta["affine"])  # the stored (RAS) volume's own voxel → world map
    points = np.c_[landmarks(meta["shape"]), np.ones(9)].T
    truth = np.linalg.inv(transform) @ stored_to_world @ points
    found = np.asarray(meta["atlas_affine"]) @ points
    errors = np.linalg.norm((found - truth)[:3], axis=0)
    assert errors.max() <= 1.5, errors.round(2)


def test_crop_locations_of_the_registered_volume_match_the_templates_at_the_same_anatomy(
        packed_with_atlas, template_and_moved):
    _, _, transform = template_and_moved
    dataset = open_dataset(packed_with_atlas)
    template_meta, moved_meta = dataset.meta("template"), dataset.meta("moved")
    size = 16
    template_voxel = np.linalg.inv(np.asarray(template_meta["affine"]))
    moved_voxel = np.linalg.inv(np.asarray(moved_meta["affine"]))
    bounds = np.asarray(template_meta["atlas_bounds"])
    voxel_in_scaled_units = 2 * 2.0 / (bounds[1] - bounds[0])  # two template voxels (3 mm at most)
    for start in ([40, 20, 50], [60, 25, 70], [70, 30, 40]):
        template_start = np.asarray(start)
        centre_world = np.asarray(template_meta["affine"]) @ np.append(template_start + (size - 1) / 2, 1)
        moved_centre = moved_voxel @ transform @ centre_world  # the same anatomy in the moved volume
        moved_start = moved_centre[:3] - (size - 1) / 2
        expected = location(template_start, template_meta["shape"], size, template_meta)
        got = location(moved_start, moved_meta["shape"], size, moved_meta)
        assert np.all(np.abs(got - expected) <= 3.0 * voxel_in_scaled_units), (got, expected)
        assert np.all(np.abs(expected) <= 1)
    # the template registered to itself: its atlas map is its own voxel → world map
    np.testing.assert_allclose(np.asarray(template_meta["atlas_affine"]) @ np.append(template_start, 1),
                               np.linalg.inv(template_voxel) @ np.append(template_start, 1), atol=1.0)


def test_without_an_atlas_locations_are_the_crop_centre_scaled_by_the_volume_to_minus_one_one():
    assert location(np.array([0, 10, 20]), (40, 40, 40), 20).tolist() == [-0.5, 0.0, 0.5]
    assert location(np.array([-10, 0, 0]), (10, 10, 10), 30).tolist() == [0.0, 1.0, 1.0]  # clipped


def test_unusable_template_and_unrelated_volume_are_reported_not_raised(tmp_path, template_and_moved):
    template, moved, _ = template_and_moved
    flat = tmp_path / "slice.npy"
    np.save(flat, np.random.default_rng(0).random((64, 64, 1, 3)).astype(np.float32))  # 4-D, not a volume
    noise = tmp_path / "noise.nii.gz"
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.random((40, 40, 40)).astype(np.float32), np.eye(4)), str(noise))
    for fmt in ("wds", "zarr"):
        out = tmp_path / f"bad-template-{fmt}"
        summary = pack([moved], out, fmt=fmt, modality="mr", atlas=flat)
        assert summary["failed"] == 1 and summary["ok"] == 0
        line = json.loads((out / "report.jsonl").read_text())
        assert line["status"] == "failed" and "atlas template unusable" in line["reason"]
    out = tmp_path / "noise-wds"
    summary = pack([noise], out, fmt="wds", modality="mr", atlas=template)
    line = json.loads((out / "report.jsonl").read_text())
    assert line["status"] == "failed" and summary["samples"] == 0
    assert "registration" in line["reason"]


@pytest.mark.parametrize("scale, message", [(0.3, "scalings"), (-1.0, "determinant")])
def test_implausible_linear_maps_are_refused(scale, message):
    matrix = np.diag([scale, 1.0, 1.0, 1.0])
    with pytest.raises(VolumeError, match=message):
        check_plausible(matrix, metric=-0.5)
    with pytest.raises(VolumeError, match="mutual information"):
        check_plausible(np.eye(4), metric=-0.01)
    check_plausible(np.eye(4), metric=-0.5)

"""Every reader format through pack → read back; RAS orientation against nibabel; casts; modality choice."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslmed.errors import VolumeError
from sslmed.io.format import to_float
from sslmed.io.manifest import iter_shard, load_manifest
from sslmed.io.pack import pack
from sslmed.io.preprocess import cast, cast_tolerance, preprocess
from sslmed.io.readers import Volume, find_inputs, read_volume

SHAPE = (10, 8, 6)  # (i, j, k): distinct sizes so a swapped axis cannot pass


def as_float(stored: np.ndarray, meta: dict) -> np.ndarray:
    return to_float(stored, meta["scale"], meta["offset"])


def window(hu: np.ndarray) -> np.ndarray:
    """The CT normalisation computed independently: [-1000, 1000] HU → [0, 1], clipped."""
    return np.clip((hu.astype(np.float64) + 1000.0) / 2000.0, 0.0, 1.0)


def read_packed(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key → (normalised float array, metadata), read straight from the files of either format."""
    import zarr

    manifest = load_manifest(out)
    samples = {}
    if manifest["format"] == "wds":
        for entry in manifest["shards"]:
            for key, array, meta, _ in iter_shard(out / entry["path"]):
                samples[key] = (as_float(array, meta), meta)
    else:
        for entry in manifest["arrays"]:
            array = zarr.open_array(str(out / entry["path"]), mode="r")
            meta = dict(array.attrs)["sslmed"]
            samples[entry["key"]] = (as_float(array[...], meta), meta)
    return samples


def write_dicom_series(folder: Path, hu: np.ndarray, spacing_rc=(0.8, 0.7), thickness=2.5,
                       prefix: str = "IM") -> None:
    """Slices of `hu[i, j, k]` (column i, row j, slice k), shuffled order, slope 2, intercept -2048."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    stored = ((hu + 2048) / 2).astype(np.uint16)
    series = generate_uid()
    for k in np.random.default_rng(0).permutation(hu.shape[2]):
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = CTImageStorage
        file_meta.MediaStorageSOPInstanceUID = generate_uid()
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = file_meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        plane = np.ascontiguousarray(stored[:, :, k].T)  # pixel rows run along j
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing = list(spacing_rc)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, 5.0, float(k) * thickness]
        ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"{prefix}{k:04d}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def format_inputs(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, tuple]]]:
    """One volume per reader format, and the RAS-oriented HU array + spacing each must become."""
    import nrrd

    root = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(1)
    hu = (rng.integers(-600, 600, SHAPE) * 2).astype(np.float32)  # even: exact through slope 2
    hu[0, 0, 0], hu[-1, -1, -1] = -1200, 1200  # outside the window: clipping is exercised
    expected = {}
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.0, 2.0, 1.0])), str(root / "vol_nifti.nii.gz"))
    expected["vol_nifti"] = (hu, (1.5, 1.0, 2.0))
    write_dicom_series(root / "series_dicom", hu)
    expected["series_dicom"] = (hu[::-1, ::-1, :], (0.7, 0.8, 2.5))  # LPS row/column directions → RAS
    nrrd.write(str(root / "vol_nrrd.nrrd"), hu, {"space": "left-posterior-superior",
                                                  "space directions": np.diag([0.9, 1.1, 3.0]),
                                                  "space origin": np.zeros(3)})
    expected["vol_nrrd"] = (hu[::-1, ::-1, :], (0.9, 1.1, 3.0))
    np.save(root / "vol_npy.npy", hu)
    (root / "vol_npy.json").write_text(json.dumps({"spacing": [1.2, 1.2, 2.4]}))
    expected["vol_npy"] = (hu, (1.2, 1.2, 2.4))
    np.savez(root / "vol_npz.npz", image=hu, other=np.zeros(3))
    expected["vol_npz"] = (hu, (1.0, 1.0, 1.0))
    return root, expected


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_every_format_round_trips_through_pack(tmp_path, format_inputs, fmt):
    root, expected = format_inputs
    assert len(find_inputs([root])) == 5  # the DICOM folder is one input; the .json sidecar is none
    summary = pack([root], tmp_path / "out", fmt=fmt, modality="ct", chunk=4)
    assert (summary["ok"], summary["failed"]) == (5, 0)
    samples = read_packed(tmp_path / "out")
    assert set(samples) == set(expected)
    tolerance = cast_tolerance("int16") + 1e-6
    for key, (hu, spacing) in expected.items():
        values, meta = samples[key]
        assert values.shape == hu.shape, key
        np.testing.assert_allclose(values, window(hu), atol=tolerance, rtol=0, err_msg=key)
        np.testing.assert_allclose(meta["spacing"], spacing, rtol=1e-5, err_msg=key)
        assert meta["stats"]["max"] == pytest.approx(1.0) and meta["stats"]["min"] == pytest.approx(0.0)


def test_dicom_series_reader_sorts_slices_and_reads_the_modality_tag(format_inputs):
    root, expected = format_inputs
    volume = read_volume(root / "series_dicom")
    assert volume.modality == "ct" and volume.meta["slices"] == SHAPE[2]
    np.testing.assert_array_equal(volume.array, expected["vol_nifti"][0])  # file order, slope/intercept
    _, meta = preprocess(volume, modality="auto")
    assert (meta["modality"], meta["modality_source"]) == ("ct", "header")


def test_lps_volume_is_reoriented_like_nibabel_canonical(tmp_path):
    rng = np.random.default_rng(2)
    hu = rng.uniform(-1000, 1000, SHAPE).astype(np.float32)
    affine = np.array([[-1.2, 0, 0, 30], [0, -0.9, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1.0]])  # LPS-like
    image = nib.Nifti1Image(hu, affine)
    nib.save(image, str(tmp_path / "lps.nii.gz"))
    canonical = nib.as_closest_canonical(image)
    array, meta = preprocess(read_volume(tmp_path / "lps.nii.gz"), modality="ct", dtype="float16")
    reference = window(canonical.get_fdata())
    np.testing.assert_allclose(as_float(array, meta), reference, atol=cast_tolerance("float16"))
    np.testing.assert_allclose(meta["affine"], canonical.affine, atol=1e-5)


def test_resampling_to_a_target_spacing(tmp_path):
    ramp = np.broadcast_to(10.0 * np.arange(21, dtype=np.float32)[:, None, None], (21, 17, 13))
    volume = Volume(np.ascontiguousarray(ramp), (1.0, 1.0, 1.0), np.eye(4))
    array, meta = preprocess(volume, spacing=(2.0, 2.0, 3.0), modality="ct")
    assert array.shape == (11, 9, 5)  # the same extent between first and last voxel centre: 20, 16, 12 mm
    np.testing.assert_allclose(meta["spacing"], (2.0, 2.0, 3.0))
    # a linear ramp survives linear interpolation exactly: new voxel m sits at old voxel 2m
    expected = np.broadcast_to(window(20.0 * np.arange(11))[:, None, None], array.shape)
    np.testing.assert_allclose(as_float(array, meta), expected, atol=cast_tolerance("int16") + 1e-6)


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float16"])
def test_cast_recovers_the_normalised_intensity(dtype):
    values = np.random.default_rng(3).uniform(0, 1, 1000).astype(np.float32)
    stored, scale, offset = cast(values, dtype)
    assert stored.dtype == np.dtype(dtype)
    error = np.abs(stored.astype(np.float64) * scale + offset - values).max()
    assert error <= cast_tolerance(dtype) * (1 + 1e-6)


def test_auto_modality_uses_the_intensity_range_when_no_header_says():
    ct = Volume(np.linspace(-1024, 800, 1000, dtype=np.float32).reshape(10, 10, 10), (1, 1, 1), np.eye(4))
    mr = Volume(np.linspace(0, 900, 1000, dtype=np.float32).reshape(10, 10, 10), (1, 1, 1), np.eye(4))
    assert preprocess(ct)[1]["modality"] == "ct" and preprocess(mr)[1]["modality"] == "mr"
    assert preprocess(ct)[1]["modality_source"] == "heuristic"
    # MR percentiles: 0.5th → 0 and 99.5th → 1 (numpy's percentile as the reference)
    array, meta = preprocess(mr, modality="mr", dtype="float16")
    lo, hi = np.percentile(mr.array, [0.5, 99.5])
    reference = np.clip((mr.array - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(as_float(array, meta), reference, atol=2e-3)


def test_foreground_crop_keeps_the_bright_box(tmp_path):
    hu = np.full((20, 20, 20), -1000.0, np.float32)
    hu[5:12, 6:10, 8:15] = 300.0
    array, meta = preprocess(Volume(hu, (1, 1, 1), np.eye(4)), modality="ct", foreground_crop=True)
    assert array.shape == (7 + 4, 4 + 4, 7 + 4)  # the box plus a 2-voxel margin each side
    assert meta["foreground_fraction"] == pytest.approx(7 * 4 * 7 / array.size)


def test_dicom_folder_skips_non_image_files_refuses_gaps_and_mixed_series(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    hu = np.arange(4 * 3 * 4, dtype=np.float32).reshape(4, 3, 4) * 2
    write_dicom_series(tmp_path / "s", hu)
    report = Dataset()  # a DICOM object without an image plane, as found beside real series
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.save_as(tmp_path / "s" / "REPORT", enforce_file_format=True)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "s" / "beside.nii.gz"))
    assert find_inputs([tmp_path]) == [tmp_path / "s", tmp_path / "s" / "beside.nii.gz"]
    assert find_inputs([tmp_path / "s" / "IM0001.dcm"]) == [tmp_path / "s"]
    np.testing.assert_array_equal(read_volume(tmp_path / "s").array, hu)
    (tmp_path / "s" / "IM0001.dcm").rename(tmp_path / "IM0001.dcm")  # a missing middle slice
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        read_volume(tmp_path / "s")
    (tmp_path / "IM0001.dcm").rename(tmp_path / "s" / "IM0001.dcm")
    write_dicom_series(tmp_path / "s", hu, prefix="OTHER")  # a second series in the same folder
    with pytest.raises(VolumeError, match="2 DICOM series"):
        read_volume(tmp_path / "s")

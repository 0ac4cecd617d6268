"""Volume files → `Volume` (array, spacing, affine, modality, meta), validated.

Every failure — unreadable, truncated, wrong dimensionality, non-finite values — becomes a
`VolumeError` naming the file and the reason; library exceptions never escape.
"""

from __future__ import annotations

import errno
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslmed.errors import VolumeError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
NUMPY_SUFFIXES = (".npy", ".npz")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES + NUMPY_SUFFIXES
MAX_SPACING_MM = 20.0
# DICOM patient space is LPS; every affine here maps voxel indices to RAS millimetres (nibabel's convention).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray  # 3-D, float32, axis order of the file (voxel i, j, k)
    spacing: tuple[float, float, float]  # mm along the three array axes
    affine: np.ndarray  # 4x4, voxel index → RAS mm
    modality: str = "unknown"  # "ct" | "mr" | "unknown" (from a header tag, when the format has one)
    meta: dict = field(default_factory=dict)


def suffix_of(path: Path) -> str:
    """The format suffix of a path ('.nii.gz' counts as one), lower case; '' for none."""
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_volume(path: str | Path, *, repair_nonfinite: bool = False, max_voxels: int = 512**3) -> Volume:
    """Read one volume (NIfTI, DICOM series folder, NRRD, .npy/.npz) and validate it."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise VolumeError(f"{path}: empty file")
    loader = _loader_for(path)
    try:
        volume = loader(path, max_voxels)
    except VolumeError:
        raise
    except Exception as exc:  # any library failure on a bad file is the file's fault, reported as such
        raise VolumeError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    return validate(volume, path, repair_nonfinite=repair_nonfinite, max_voxels=max_voxels)


def _loader_for(path: Path):
    if path.is_dir():
        return _read_dicom_series
    suffix = suffix_of(path)
    loaders = {".nii.gz": _read_nifti, ".nii": _read_nifti, ".nrrd": _read_nrrd, ".nhdr": _read_nrrd,
               ".npy": _read_numpy, ".npz": _read_numpy, ".dcm": _read_dicom_series}
    if suffix in loaders:
        return loaders[suffix]
    if _is_dicom(path):
        return _read_dicom_series
    raise VolumeError(f"{path}: unsupported format (expected NIfTI, DICOM, NRRD, .npy or .npz)")


def validate(volume: Volume, path: Path, *, repair_nonfinite: bool, max_voxels: int) -> Volume:
    """Shape, size, finiteness and spacing checks shared by every format."""
    array = _squeeze_to_3d(np.asarray(volume.array), path)
    if array.size == 0:
        raise VolumeError(f"{path}: empty volume (shape {array.shape})")
    if array.size > max_voxels:
        raise VolumeError(f"{path}: {array.size} voxels exceeds the limit of {max_voxels}")
    array = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count:
        if not repair_nonfinite:
            raise VolumeError(f"{path}: {count} non-finite voxel(s) (NaN/Inf); "
                              "use --repair-nonfinite to replace them by 0")
        array = np.where(bad, np.float32(0), array)
        volume.meta["nonfinite_repaired"] = count
    spacing = tuple(float(s) for s in volume.spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and 0 < s <= MAX_SPACING_MM for s in spacing):
        raise VolumeError(f"{path}: implausible voxel spacing {spacing} mm "
                          f"(expected 0 < s <= {MAX_SPACING_MM})")
    affine = np.asarray(volume.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: invalid affine (singular or non-finite orientation matrix)")
    return Volume(array, spacing, affine, volume.modality, volume.meta)


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise VolumeError(f"{path}: {array.ndim}-D image of shape {array.shape}; only 3-D volumes "
                          "are supported (split time series / channels into separate files)")
    if array.ndim < 3:
        raise VolumeError(f"{path}: {array.ndim}-D image of shape {array.shape}; a 3-D volume is required")
    if min(array.shape) == 1 and array.size > 0:
        raise VolumeError(f"{path}: a single slice (shape {array.shape}); a 3-D volume is required")
    return array


def _check_size(shape: Iterable[int], path: Path, max_voxels: int) -> None:
    """Refuse oversized volumes from the header, before their data is loaded."""
    voxels = int(np.prod([int(s) for s in shape], dtype=np.int64))
    if voxels > max_voxels:
        raise VolumeError(f"{path}: {voxels} voxels exceeds the limit of {max_voxels}")


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


# --- NIfTI ---------------------------------------------------------------------------------------

def _read_nifti(path: Path, max_voxels: int) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))  # reads the header only
    _check_size(image.shape, path, max_voxels)
    if path.name.lower().endswith(".gz"):
        # nibabel stops reading at the end of the data and never checks the gzip CRC, so a corrupted
        # stream could load as wrong voxels; decompress it whole (CRC checked) and read from memory —
        # but never past what the header declares: a small file can expand to gigabytes
        data_bytes = int(np.prod(image.shape)) * image.get_data_dtype().itemsize
        declared = int(image.header["vox_offset"]) + data_bytes
        raw = gunzip_bounded(path, max(declared, 540) + GZIP_SLACK_BYTES)
        sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
        image = (nib.Nifti2Image if 540 in sizeof_hdr else nib.Nifti1Image).from_bytes(raw)
    array = np.asarray(image.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    affine = image.affine
    zooms = image.header.get_zooms()[:3]
    spacing = tuple(float(z) for z in zooms) if len(zooms) == 3 else spacing_of(affine)
    return Volume(array, spacing, affine, "unknown", {"format": "nifti"})


GZIP_SLACK_BYTES = 1 << 16  # writers may pad after the data; a bomb is gigabytes, not kilobytes


def gunzip_bounded(path: Path, limit: int) -> bytes:
    """The gzip file's contents (every member, CRCs checked); VolumeError as soon as they would
    exceed `limit` bytes, so memory stays bounded by what the header declares."""
    out, total, inflate = [], 0, None
    with open(path, "rb") as handle:
        data = b""
        while True:
            data = data or handle.read(1 << 20)
            if not data:
                break
            inflate = inflate or zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
            piece = inflate.decompress(data, limit + 1 - total)
            total += len(piece)
            if total > limit:
                raise VolumeError(f"{path}: decompresses beyond the {limit} bytes its header declares "
                                  "(a decompression bomb, or a damaged file)")
            out.append(piece)
            if inflate.eof:  # a gzip member ends (its CRC checked); another may follow
                data, inflate = inflate.unused_data, None
            else:
                data = inflate.unconsumed_tail
    if inflate is not None:
        raise VolumeError(f"{path}: cannot read (truncated gzip stream)")
    return b"".join(out)


# --- NRRD ----------------------------------------------------------------------------------------

NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": np.eye(4), "ras": np.eye(4),
    "left-posterior-superior": LPS_TO_RAS, "lps": LPS_TO_RAS,
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0, 1.0]), "las": np.diag([-1.0, 1.0, 1.0, 1.0]),
}


def _read_nrrd(path: Path, max_voxels: int) -> Volume:
    import nrrd

    header = nrrd.read_header(str(path))
    _check_size(header.get("sizes", []), path, max_voxels)
    array, header = nrrd.read(str(path))
    affine = _nrrd_affine(header, array.ndim)
    return Volume(array, spacing_of(affine), affine, "unknown", {"format": "nrrd"})


def _nrrd_affine(header: dict, ndim: int) -> np.ndarray:
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        rows = [np.asarray(d, dtype=float) for d in directions
                if d is not None and np.all(np.isfinite(np.asarray(d, dtype=float)))]
        if len(rows) == 3:
            affine[:3, :3] = np.stack(rows, axis=1)
    elif header.get("spacings") is not None:
        spacings = [float(s) for s in header["spacings"] if np.isfinite(float(s))][:3]
        if len(spacings) == 3:
            affine[:3, :3] = np.diag(spacings)
    if header.get("space origin") is not None:
        affine[:3, 3] = np.asarray(header["space origin"], dtype=float)[:3]
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in NRRD_SPACE_TO_RAS:
        raise VolumeError(f"unsupported NRRD space '{space}'")
    return NRRD_SPACE_TO_RAS[space] @ affine


# --- NumPy ---------------------------------------------------------------------------------------

def _read_numpy(path: Path, max_voxels: int) -> Volume:
    """A bare array: 1 mm isotropic, identity orientation, unless a sidecar `<stem>.json` says otherwise."""
    if suffix_of(path) == ".npy":
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        _check_size(mapped.shape, path, max_voxels)
        array = np.array(mapped)
    else:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            name = next((n for n in ("array", "image") if n in names), names[0] if len(names) == 1 else None)
            if name is None:
                raise VolumeError(f"{path}: .npz holds {names}; expected one array or a key 'array'/'image'")
            with archive.zip.open(f"{name}.npy") as member:  # the header alone, before any data
                _check_size(npy_header_shape(member), path, max_voxels)
            array = archive[name]
    sidecar = _read_sidecar(path)
    if "affine" in sidecar:
        affine = np.asarray(sidecar["affine"], dtype=float)
    else:
        affine = np.diag([*sidecar.get("spacing", [1.0, 1.0, 1.0]), 1.0]).astype(float)
    modality = str(sidecar.get("modality", "unknown")).lower()
    return Volume(array, spacing_of(affine), affine, modality if modality in ("ct", "mr") else "unknown",
                  {"format": suffix_of(path)[1:]})


def npy_header_shape(stream) -> tuple[int, ...]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)[0]


def _read_sidecar(path: Path) -> dict:
    sidecar = path.with_name(path.name[: -len(suffix_of(path))] + ".json")
    if not sidecar.exists():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise VolumeError(f"{sidecar}: invalid sidecar JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise VolumeError(f"{sidecar}: sidecar must be a JSON object with 'spacing' and/or 'affine'")
    return data


# --- DICOM ---------------------------------------------------------------------------------------

def _is_dicom(path: Path) -> bool:
    from pydicom.misc import is_dicom

    try:
        return path.is_file() and is_dicom(str(path))
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM slices directly inside a folder (by .dcm suffix or by the DICM preamble)."""
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and (p.suffix.lower() == ".dcm" or (suffix_of(p) not in SUPPORTED_SUFFIXES
                                                               and _is_dicom(p)))]


def _read_dicom_series(path: Path, max_voxels: int) -> Volume:
    """A folder of single-frame slices of one series → one volume, slices ordered along their normal."""
    import pydicom

    folder = path if path.is_dir() else path.parent
    files = dicom_files(folder)
    if not files:
        raise VolumeError(f"{folder}: no DICOM files in the folder")
    datasets = [pydicom.dcmread(str(f)) for f in files]
    # DICOMDIR, structured reports and the like carry no image plane: not part of the volume
    slices = [d for d in datasets if "PixelData" in d and "ImagePositionPatient" in d
              and "ImageOrientationPatient" in d and "PixelSpacing" in d]
    if not slices:
        raise VolumeError(f"{folder}: no image slices with position, orientation and pixel spacing "
                          f"among {len(files)} DICOM file(s)")
    if any(int(getattr(s, "NumberOfFrames", 1) or 1) > 1 for s in slices):
        raise VolumeError(f"{folder}: multi-frame DICOM is not supported; convert it to NIfTI first")
    series = {str(getattr(s, "SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise VolumeError(f"{folder}: {len(series)} DICOM series in one folder; "
                          "put each series in its own folder")
    _check_size((slices[0].Rows, slices[0].Columns, len(slices)), folder, max_voxels)
    orientation = np.asarray(slices[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.asarray(s.ImagePositionPatient, dtype=float) for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices, positions = [slices[i] for i in order], positions[order]
    _check_slice_geometry(folder, slices, positions @ normal)
    # pixel_array is (rows, columns); columns advance along row_dir, so index i = column, j = row
    planes = [_rescaled(s).T for s in slices]
    if len({p.shape for p in planes}) > 1:
        raise VolumeError(f"{folder}: slices of different sizes in one series")
    array = np.stack(planes, axis=-1)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    step = (positions[-1] - positions[0]) / (len(slices) - 1) if len(slices) > 1 else normal * float(
        getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * col_spacing, col_dir * row_spacing
    lps[:3, 2], lps[:3, 3] = step, positions[0]
    affine = LPS_TO_RAS @ lps
    modality = {"CT": "ct", "MR": "mr"}.get(str(getattr(slices[0], "Modality", "")).upper(), "unknown")
    meta = {"format": "dicom", "slices": len(slices), "series_uid": series.pop()}
    return Volume(array, spacing_of(affine), affine, modality, meta)


def _check_slice_geometry(folder: Path, slices: list, distances: np.ndarray) -> None:
    """One orientation, distinct and evenly spaced slices: otherwise the affine would misplace voxels."""
    orientations = np.array([np.asarray(s.ImageOrientationPatient, dtype=float) for s in slices])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise VolumeError(f"{folder}: slices with different orientations in one series")
    if len(slices) < 2:
        return
    gaps = np.diff(distances)
    if gaps.min() <= 1e-6:
        raise VolumeError(f"{folder}: duplicate slice positions along the slice normal")
    if gaps.max() - gaps.min() > max(0.01 * gaps.mean(), 1e-3):
        raise VolumeError(f"{folder}: uneven slice spacing ({gaps.min():.3g}–{gaps.max():.3g} mm); "
                          "a slice may be missing")


def _rescaled(dataset) -> np.ndarray:
    slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    return dataset.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


# --- discovery -----------------------------------------------------------------------------------

Refused = list[tuple[Path, str]]  # (path, why it is not an input): symlink loops and cycles


def find_inputs(paths: Iterable[str | Path], refused: Refused | None = None) -> list[Path]:
    """Expand folders into inputs, searched recursively for supported files.

    A folder holding DICOM slices is itself one input (a series) and a .dcm file stands for its folder;
    packed datasets (a folder with a manifest.json) are skipped. Other paths given explicitly are kept as
    they are (even if missing or unsupported) so they are reported, not silently dropped. Symlinks that
    loop, and folder symlinks back into a folder already walked (`up -> ..`), are not followed: each is
    appended to `refused` with the reason, so the walk ends and the caller can report them."""
    refused = [] if refused is None else refused
    found: list[Path] = []
    walked: set[tuple[int, int]] = set()  # (device, inode) of every folder entered
    for raw in paths:
        path = Path(raw)
        problem = symlink_problem(path)
        if problem:
            refused.append((path, problem))
        elif path.is_dir():
            found.extend(_expand(path, walked, refused))
        else:
            found.append(path.parent if path.suffix.lower() == ".dcm" and path.is_file() else path)
    unique: dict[Path, Path] = {}  # the same file named twice (relative and absolute) is one input
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def symlink_problem(path: Path) -> str | None:
    """'symlink loop' when following `path` never ends; None otherwise (a dangling link is an input that
    fails to read, and is reported as such)."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "symlink loop"
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else None
    return None


def _expand(folder: Path, walked: set[tuple[int, int]], refused: Refused) -> list[Path]:
    if (folder / "manifest.json").is_file():
        return []  # a packed dataset (e.g. --out inside the input folder) is output, not input
    info = folder.stat()
    if (info.st_dev, info.st_ino) in walked:
        refused.append((folder, "folder symlink into a folder already walked (a cycle or a duplicate)"))
        return []
    walked.add((info.st_dev, info.st_ino))
    inputs: list[Path] = [folder] if dicom_files(folder) else []
    for child in sorted(folder.iterdir()):
        problem = symlink_problem(child)
        if problem:
            refused.append((child, problem))
        elif child.is_dir():
            inputs.extend(_expand(child, walked, refused))
        elif suffix_of(child) in SUPPORTED_SUFFIXES:
            inputs.append(child)
    return inputs

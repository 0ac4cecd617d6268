"""Generated phantoms for tests, benchmarks and scale runs; the real MNI152 volumes nilearn ships and the
real example T1 shipped with sslmed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from sslmed.errors import DataError

# (body, organs, dense structure, background) intensities: HU for CT, arbitrary scanner units for MR
INTENSITIES = {"ct": (40.0, (-800.0, 60.0, 20.0), 700.0, -1000.0),
               "mr": (300.0, (600.0, 150.0, 900.0), 50.0, 0.0)}
MNI152_FILES = ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")


def phantom(shape: tuple[int, int, int], rng: np.random.Generator, modality: str = "mr") -> np.ndarray:
    """An anatomy-like volume: a body ellipsoid holding smaller ellipsoid 'organs', a dense shell, noise."""
    if modality not in INTENSITIES:
        raise DataError(f"phantom modality must be ct or mr, not {modality!r}")
    body, organs, dense, background = INTENSITIES[modality]
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij"))
    volume = np.full(shape, background, dtype=np.float32)
    radii = rng.uniform(0.7, 0.9, 3)
    inside = _ellipsoid(grid, rng.uniform(-0.05, 0.05, 3), radii)
    shell = inside & ~_ellipsoid(grid, np.zeros(3), radii - 0.08)
    volume[inside] = body
    volume[shell] = dense
    for value in organs:
        centre = rng.uniform(-0.35, 0.35, 3)
        volume[_ellipsoid(grid, centre, rng.uniform(0.12, 0.3, 3))] = value
    noise = 0.03 * (abs(body) + 100.0)
    volume += rng.normal(0.0, noise, shape).astype(np.float32) * inside
    return volume


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """Anisotropic spacing in [0.7, 2.0] mm, random axis flips (not always RAS) and origin."""
    spacing = rng.uniform(0.7, 2.0, 3)
    flips = rng.choice([-1.0, 1.0], 3)
    affine = np.diag([*(spacing * flips), 1.0])
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    return affine


def write_phantoms(out_dir: str | Path, n: int, shape: tuple[int, int, int] = (64, 64, 64), seed: int = 0,
                   fmt: str = "nii.gz", modality: str = "mr") -> list[Path]:
    """Write `n` deterministic phantoms as NIfTI (`fmt` nii.gz or nii); returns their paths."""
    import nibabel as nib

    if fmt not in ("nii.gz", "nii"):
        raise DataError(f"phantom format must be nii.gz or nii, not {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        array = phantom(tuple(shape), rng, modality)
        path = out_dir / f"phantom-{modality}-{seed:03d}-{index:05d}.{fmt}"
        image = nib.Nifti1Image(array, random_affine(rng))
        image.header.set_xyzt_units("mm")
        nib.save(image, str(path))
        paths.append(path)
    return paths


ASSETS = Path(__file__).resolve().parent.parent / "assets"
ITK_T1 = ASSETS / "KmeansTest_T1UCharRaw.nii.gz"
ITK_T1_SKULL_STRIP = ASSETS / "KmeansTest_T1RawSkullStrip.nii.gz"  # non-zero inside the brain


def itk_t1_path() -> Path:
    """A real single-subject T1 head (ITK's example data, 128×128×62 at 2×2×3 mm), shipped with sslmed."""
    if not ITK_T1.is_file():
        raise DataError(f"{ITK_T1}: the example T1 volume is missing from the installation")
    return ITK_T1


def write_itk_t1_brain(folder: str | Path) -> Path:
    """The ITK T1 with everything outside its skull strip set to 0, as NIfTI in `folder`: a brain-extracted
    subject comparable with the brain-extracted MNI152 template (registering a whole head to a brain
    template fits the scalp to the brain's outline)."""
    import nibabel as nib

    if not ITK_T1_SKULL_STRIP.is_file():
        raise DataError(f"{ITK_T1_SKULL_STRIP}: the example skull strip is missing from the installation")
    head = nib.load(str(itk_t1_path()))
    brain = np.asarray(nib.load(str(ITK_T1_SKULL_STRIP)).dataobj) > 0
    path = Path(folder) / "itk-t1-brain.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(head.dataobj, dtype=np.float32) * brain, head.affine), str(path))
    return path


def mni152_paths() -> list[Path]:
    """[T1 template, grey-matter, white-matter probability] of MNI152 2009 (1 mm) from nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn is not installed; it ships the MNI152 template (pip install nilearn)")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = [data / name for name in MNI152_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{data}: MNI152 files missing from the nilearn installation: {missing}")
    return paths

"""Small registered datasets for the atlas-grid and located-evaluation tests: a phantom head as the atlas
template and three subjects resampled from it through known maps, packed with `--atlas` whose
registration is replaced by the known map itself (registration is tested in test_io_register)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

TEMPLATE_SHAPE = (40, 40, 40)


def rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def moved_world(degrees: float, scale: float, shift) -> np.ndarray:
    """Template world → subject world: rotate about z, scale, shift (mm)."""
    out = np.eye(4)
    out[:3, :3] = scale * rotation_z(degrees)
    out[:3, 3] = shift
    return out


# subject name → (template world → subject world, shape of its 2 mm grid); "narrow" sees half the head
SUBJECTS = {"near": (moved_world(6, 1.05, (3, -2, 1)), (46, 46, 46)),
            "far": (moved_world(-8, 0.95, (-4, 3, 2)), (46, 46, 45)),  # shapes tell the subjects apart
            "narrow": (moved_world(3, 1.0, (0, 0, 0)), (12, 46, 46))}
LABELS = {"template": "a", "near": "b", "far": "a", "narrow": "b"}


def pack_registered(folder: Path) -> dict:
    """{"zarr": packed dir, "template": template file, "known": stored shape → template-to-subject map}."""
    import SimpleITK as sitk

    from sslmed.io import register
    from sslmed.io.pack import pack
    from sslmed.io.register import Registration, to_sitk, world_bounds
    from sslmed.io.synthetic import phantom

    head = phantom(TEMPLATE_SHAPE, np.random.default_rng(5), "mr")
    # plus a ramp along the three axes: every place in the head has an intensity level of its own
    ramp = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in TEMPLATE_SHAPE], indexing="ij")).sum(0)
    head = (head + 400.0 * ramp * (head > 100)).astype(np.float32)
    template_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    template_affine[:3, 3] = -2.0 * (np.array(TEMPLATE_SHAPE) - 1) / 2  # centred on the world origin
    template = folder / "template.nii.gz"
    nib.save(nib.Nifti1Image(head, template_affine), str(template))
    known = {head.shape: np.eye(4)}  # stored shape → template world → subject world
    paths = [template]
    for name, (transform, shape) in SUBJECTS.items():
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = -2.0 * (np.array(shape) - 1) / 2
        inverse = np.linalg.inv(transform)
        pull = sitk.AffineTransform(inverse[:3, :3].ravel().tolist(), inverse[:3, 3].tolist())
        grid = to_sitk(np.zeros(shape, np.float32), affine)
        moved = sitk.Resample(to_sitk(head, template_affine), grid, pull, sitk.sitkLinear, 0.0)
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(sitk.GetArrayFromImage(moved).transpose(2, 1, 0), affine), str(path))
        known[shape] = transform
        paths.append(path)
    with open(folder / "tags.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([p.name, LABELS[p.name.split(".")[0]]] for p in paths)

    def known_registration(moving, moving_affine, fixed, fixed_affine):
        to_template = np.linalg.inv(known[moving.shape]) @ np.asarray(moving_affine)
        return Registration(to_template, -0.6, world_bounds(fixed.shape, fixed_affine))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(register, "register_arrays", known_registration)
        pack(paths, folder / "zarr", fmt="zarr", modality="mr", atlas=template, chunk=16,
             tags=folder / "tags.csv")
    return {"zarr": folder / "zarr", "template": template, "known": known}

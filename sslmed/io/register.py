"""Affine registration of a volume to an atlas template (SimpleITK), and atlas coordinates of crops.

`sslmed pack --atlas TEMPLATE` registers every preprocessed volume to the template: rigid, then affine,
both driven by Mattes mutual information (so a T1 registers to a T1 template whatever its intensity
scale) over a pyramid (rigid at 8 and 4 mm, affine at 8, 4 and 2 mm), optimised by L-BFGS-B, after a
centre-of-mass initialisation: about 5 s of one core per brain. The result is stored per sample:

* `atlas_affine`: 4×4, the stored volume's voxel indices → the template's world millimetres (RAS);
* `atlas_metric`: the final mutual-information metric (SimpleITK's sign: more negative is better);
* `atlas_bounds`: [[x, y, z] min, max] world millimetres of the template's voxel centres: the extent
  crop locations are scaled by, to [−1, 1].

A registration that raises (no overlap), or whose result is implausible (metric, determinant or a
scaling out of range), is a `VolumeError`: `sslmed pack` reports it and skips the volume.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmed.errors import VolumeError

# Plausibility of the template → volume linear map: real heads differ from a template by tens of per
# cent in size; a factor of two, or a near-singular map, means the optimiser went astray.
SCALE_RANGE = (0.5, 2.0)  # singular values of the linear part
DETERMINANT_RANGE = (0.25, 4.0)
# Mattes mutual information of a converged brain-to-brain registration is well below this (about
# −0.4 to −0.9 at 50 bins); unrelated content stays near 0.
MAX_METRIC = -0.15
HISTOGRAM_BINS = 50
SAMPLING = 0.05  # fraction of the (working-resolution) template voxels drawn for the metric at each level
SAMPLING_SEED = 0  # fixed: the same inputs give the same registration (and byte-identical packs)
WORKING_SPACING_MM = 2.0  # both images are block-averaged to about this before registering: an affine
# map has 12 parameters, and 2 mm voxels place them to well under a millimetre at a quarter of the cost
# (shrink factor, smoothing sigma in mm) per level. The rigid stage only has to bring the two brains into
# register for the affine one, so it stops at the 4 mm level; the affine stage refines down to 2 mm.
RIGID_PYRAMID = ((4, 4.0), (2, 2.0))
AFFINE_PYRAMID = ((4, 4.0), (2, 2.0), (1, 0.0))
# L-BFGS-B: the metric's sample points are drawn once per level, so within a level it is a smooth
# deterministic function that a quasi-Newton method settles in tens of iterations, where a regular-step
# gradient descent crawled along the valley for hundreds.
ITERATIONS = 100  # per level, at most
GRADIENT_TOLERANCE = 1e-5
FUNCTION_EVALUATIONS = 400  # per level, at most (line searches included)


@dataclass(frozen=True)
class Registration:
    atlas_affine: np.ndarray  # 4×4: voxel index of the registered volume → template world mm
    metric: float
    bounds: np.ndarray  # (2, 3): template world extent (voxel centres)

    def meta(self, template: str) -> dict:
        return {"atlas_affine": self.atlas_affine.tolist(), "atlas_metric": self.metric,
                "atlas_bounds": self.bounds.tolist(), "atlas_template": template}


# ---- images in SimpleITK --------------------------------------------------------------------------


def to_sitk(array: np.ndarray, affine: np.ndarray):
    """A SimpleITK image whose physical space is the affine's world (RAS mm here; the registration
    only needs both images in one space). SimpleITK indexes (x, y, z) = our (i, j, k)."""
    import SimpleITK as sitk

    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise VolumeError("an affine with shear cannot be registered (its axes are not orthogonal)")
    xyz_last = np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0))
    image = sitk.GetImageFromArray(xyz_last)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in np.asarray(affine)[:3, 3]])
    return image


def working_resolution(image):
    """`image` block-averaged to about WORKING_SPACING_MM per voxel (unchanged where already coarser)."""
    import SimpleITK as sitk

    factors = [max(1, int(round(WORKING_SPACING_MM / s))) for s in image.GetSpacing()]
    return image if factors == [1, 1, 1] else sitk.BinShrink(image, factors)


def transform_matrix(transform) -> np.ndarray:
    """A SimpleITK matrix transform (fixed → moving physical points) as a 4×4 homogeneous matrix."""
    matrix = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.array(transform.GetCenter(), dtype=np.float64)
    translation = np.array(transform.GetTranslation(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = translation + centre - matrix @ centre
    return out


def world_bounds(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """(2, 3) min and max world coordinates over the corner voxel centres of a volume."""
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")).reshape(3, -1).T
    world = (np.asarray(affine)[:3, :3] @ corners.T).T + np.asarray(affine)[:3, 3]
    return np.stack([world.min(axis=0), world.max(axis=0)])


# ---- registration ----------------------------------------------------------------------------------


def _method(sitk, seed: int, pyramid=AFFINE_PYRAMID):
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=GRADIENT_TOLERANCE,
                                numberOfIterations=ITERATIONS, maximumNumberOfCorrections=5,
                                maximumNumberOfFunctionEvaluations=FUNCTION_EVALUATIONS,
                                costFunctionConvergenceFactor=1e7)
    # no parameter scales: ITK's L-BFGS-B ignores them (with a warning); its curvature estimate does the
    # balancing of rotation against translation that scales do for gradient descent
    method.SetShrinkFactorsPerLevel([s for s, _ in pyramid])
    method.SetSmoothingSigmasPerLevel([sigma for _, sigma in pyramid])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _run(sitk, fixed, moving, transform, pyramid):
    method = _method(sitk, SAMPLING_SEED, pyramid)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return transform


def register_arrays(moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray,
                    fixed_affine: np.ndarray) -> Registration:
    """Register the `moving` volume to the `fixed` template: rigid, then affine. Raises VolumeError when
    SimpleITK fails (no overlap) or the result is implausible."""
    import SimpleITK as sitk

    fixed_image = working_resolution(to_sitk(fixed, fixed_affine))
    moving_image = working_resolution(to_sitk(moving, moving_affine))
    try:
        rigid = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        rigid = _run(sitk, fixed_image, moving_image, sitk.Euler3DTransform(rigid), RIGID_PYRAMID)
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetCenter(rigid.GetCenter())
        affine.SetTranslation(rigid.GetTranslation())
        affine = _run(sitk, fixed_image, moving_image, affine, AFFINE_PYRAMID)
        metric = final_metric(sitk, fixed_image, moving_image, affine)
    except RuntimeError as exc:  # SimpleITK reports no overlap and the like as RuntimeError
        first = next((line for line in str(exc).splitlines() if "Description:" in line), str(exc)[-200:])
        raise VolumeError(f"registration to the atlas failed ({first.strip()})") from None
    template_to_volume = transform_matrix(affine)
    check_plausible(template_to_volume, metric)
    atlas_affine = np.linalg.inv(template_to_volume) @ np.asarray(moving_affine, dtype=np.float64)
    return Registration(atlas_affine, metric, world_bounds(fixed.shape, fixed_affine))


def final_metric(sitk, fixed, moving, transform) -> float:
    """Mutual information of the result at full resolution (the optimiser's last value is per level)."""
    method = _method(sitk, SAMPLING_SEED)
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0])
    method.SetInitialTransform(transform)
    return float(method.MetricEvaluate(fixed, moving))


def check_plausible(template_to_volume: np.ndarray, metric: float) -> None:
    linear = template_to_volume[:3, :3]
    scales = np.linalg.svd(linear, compute_uv=False)
    determinant = float(np.linalg.det(linear))
    problems = []
    if not np.isfinite(metric) or metric > MAX_METRIC:
        problems.append(f"mutual information {metric:.3f} > {MAX_METRIC} (no anatomical match)")
    if not DETERMINANT_RANGE[0] <= determinant <= DETERMINANT_RANGE[1]:
        problems.append(f"determinant {determinant:.3g} outside {DETERMINANT_RANGE} (or a reflection)")
    if scales.min() < SCALE_RANGE[0] or scales.max() > SCALE_RANGE[1]:
        problems.append(f"scalings {np.round(scales, 3).tolist()} outside {SCALE_RANGE}")
    if problems:
        raise VolumeError("implausible registration to the atlas: " + "; ".join(problems))


# ---- the template ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def load_template(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalised float32 array, RAS affine) of the template, preprocessed as `sslmed pack --modality mr`
    does at native spacing; read once per process."""
    from sslmed.io.format import to_float
    from sslmed.io.preprocess import preprocess
    from sslmed.io.readers import read_volume

    try:
        stored, meta = preprocess(read_volume(path), modality="mr", dtype="float16")
    except VolumeError as exc:
        raise VolumeError(f"atlas template unusable: {exc}") from None
    return to_float(stored, meta["scale"], meta["offset"]), np.asarray(meta["affine"], dtype=np.float64)


def register_to_atlas(stored: np.ndarray, meta: dict, template: str | Path) -> dict:
    """The atlas entries of a sample's metadata, for a volume as `preprocess` stores it."""
    from sslmed.io.format import to_float

    fixed, fixed_affine = load_template(str(template))
    moving = to_float(stored, meta["scale"], meta["offset"])
    registration = register_arrays(moving, np.asarray(meta["affine"], dtype=np.float64), fixed, fixed_affine)
    return registration.meta(Path(template).name)


# ---- crop locations in atlas coordinates --------------------------------------------------------------


def atlas_location(centre_voxel: np.ndarray, meta: dict) -> np.ndarray:
    """A voxel position of a registered volume → template world mm scaled to [−1, 1] by the template's
    extent (clipped: a crop centre beyond the template's edge sits on the boundary)."""
    point = np.append(np.asarray(centre_voxel, dtype=np.float64), 1.0)
    world = np.asarray(meta["atlas_affine"], dtype=np.float64) @ point
    low, high = np.asarray(meta["atlas_bounds"], dtype=np.float64)
    return (2.0 * (world[:3] - low) / (high - low) - 1.0).clip(-1, 1).astype(np.float32)

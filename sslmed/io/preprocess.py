"""Volume → stored array: RAS orientation, optional resampling, intensity normalisation, cast.

The spatial and intensity steps are MONAI transforms; this module only chooses and orders them and
records what it did, so that `stored * scale + offset` gives back the normalised float intensity.
"""

from __future__ import annotations

import numpy as np

from sslmed.errors import VolumeError
from sslmed.io.readers import Volume, spacing_of

CT_WINDOW = (-1000.0, 1000.0)  # HU mapped to [0, 1]
MR_PERCENTILES = (0.5, 99.5)  # mapped to [0, 1]
CT_HEURISTIC_MIN = -500.0  # air in CT is about -1000 HU; MR intensities are never that negative
FOREGROUND_THRESHOLD = 0.1  # normalised intensity above which a voxel counts as foreground
DTYPES = {"int16": 32767.0, "uint8": 255.0, "float16": None}  # levels for [0, 1], or None (float)


def resolve_modality(volume: Volume, requested: str) -> tuple[str, str]:
    """(modality, how it was decided): the user's choice, the file's header, or the intensity range."""
    if requested in ("ct", "mr"):
        return requested, "user"
    if requested != "auto":
        raise VolumeError(f"unknown modality '{requested}' (expected ct, mr or auto)")
    if volume.modality in ("ct", "mr"):
        return volume.modality, "header"
    return ("ct" if float(volume.array.min()) < CT_HEURISTIC_MIN else "mr"), "heuristic"


def _is_foreground(x):
    return x > FOREGROUND_THRESHOLD


def preprocess(volume: Volume, *, spacing: tuple[float, float, float] | None = None, modality: str = "auto",
               dtype: str = "int16", foreground_crop: bool = False) -> tuple[np.ndarray, dict]:
    """Orient to RAS, resample (if `spacing`), normalise to [0, 1], optionally crop, cast.

    Returns the stored array and its metadata (shape, dtype, scale, offset, spacing, affine, modality,
    modality_source, foreground_fraction, stats)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        CropForeground,
        Orientation,
        ScaleIntensityRange,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    if dtype not in DTYPES:
        raise VolumeError(f"unknown dtype '{dtype}' (expected one of {', '.join(DTYPES)})")
    low, high = float(volume.array.min()), float(volume.array.max())
    if low == high:
        raise VolumeError(f"constant intensity ({low:g}) everywhere: no image content")
    resolved, source = resolve_modality(volume, modality)
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None],
                       affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    # explicit labels: our affines map to RAS millimetres (nibabel convention)
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    if spacing is not None:
        image = Spacing(pixdim=tuple(float(s) for s in spacing), mode="bilinear")(image)
    if resolved == "ct":
        image = ScaleIntensityRange(a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0,
                                    clip=True)(image)
    else:
        image = ScaleIntensityRangePercentiles(lower=MR_PERCENTILES[0], upper=MR_PERCENTILES[1],
                                               b_min=0.0, b_max=1.0, clip=True)(image)
    if foreground_crop:
        image = CropForeground(select_fn=_is_foreground, margin=2, allow_smaller=True)(image)
    affine = np.asarray(image.affine, dtype=np.float64)
    normalised = np.asarray(image.array[0], dtype=np.float32)
    if normalised.size == 0 or min(normalised.shape) < 1:
        raise VolumeError(f"preprocessing left an empty volume (shape {normalised.shape})")
    stored, scale, offset = cast(normalised, dtype)
    meta = {
        "shape": list(stored.shape), "dtype": dtype, "scale": scale, "offset": offset,
        "spacing": list(spacing_of(affine)), "affine": affine.tolist(),
        "modality": resolved, "modality_source": source,
        "foreground_fraction": float(np.mean(_is_foreground(normalised))),
        "stats": {"min": float(normalised.min()), "max": float(normalised.max()),
                  "mean": float(normalised.mean()), "std": float(normalised.std())},
    }
    return stored, meta


def cast(normalised: np.ndarray, dtype: str) -> tuple[np.ndarray, float, float]:
    """[0, 1] float → (stored, scale, offset) with stored * scale + offset ≈ normalised."""
    levels = DTYPES[dtype]
    if levels is None:
        return normalised.astype(np.float16), 1.0, 0.0
    stored = np.rint(np.clip(normalised, 0.0, 1.0) * levels).astype(dtype)
    return stored, 1.0 / levels, 0.0


def cast_tolerance(dtype: str) -> float:
    """Largest |stored * scale + offset - normalised| a cast to `dtype` can introduce on [0, 1]."""
    levels = DTYPES[dtype]
    return 0.5 / levels if levels else 2.0**-11

"""The data's last stage, on the training device: stored crops → float, then batched augmentation.

The loader hands over crops as stored (int16 / uint8 / float16) with each volume's scale and offset and
each crop's box inside its volume; `to_float` converts them on the device, exactly as `StoredVolume.read_crop`
does on the host. With `data.augment_on=device` every view of the batch is then augmented there, the
whole batch at once: flips, one `affine_grid` + `grid_sample` for rotation / scaling / translation,
intensity scale and shift, gamma, a polynomial bias field, Gaussian blur and Gaussian noise — MONAI's
per-crop transforms (`stages.augmentation`, and RandAdjustContrast / RandBiasField / RandGaussianSmooth
for the MRI-realistic families) computed for many crops in one go.

Every random draw comes from `sslmed.rng.step_generator(seed, rank, step, device, AUGMENT, micro_step)`:
the augmented batch is a pure function of the loader's batch and the step's position, so a resumed run
reproduces it bit for bit, with no state saved.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sslmed import rng
from sslmed.config import Config
from sslmed.errors import ConfigError

VIEWS = ("image", "image2", "neighbour", "neighbour2")


@dataclass(frozen=True)
class Ranges:
    """Probabilities and ranges of each family (uniform draws; MONAI's parameter conventions)."""

    flip_prob: float = 0.5  # per axis
    affine_prob: float = 0.5
    rotate: float = 0.15  # radians about each axis, ±
    scale: float = 0.1  # zoom factor 1 ± this, per axis
    translate: float = 0.0  # voxels along each axis, ±
    intensity_scale_prob: float = 0.5
    intensity_scale: float = 0.1  # x · (1 ± this)
    shift_prob: float = 0.5
    shift: float = 0.05  # x + (± this)
    gamma_prob: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)  # MONAI AdjustContrast: rescaled to [0, 1], ** gamma, back
    bias_prob: float = 0.3
    bias_degree: int = 3
    # Legendre coefficients of log(field), as MONAI RandBiasField; centred on 0 (MONAI's default (0, 0.1)
    # sums its 20 terms to a field of up to e² ≈ 7× at the corners)
    bias_coeff: tuple[float, float] = (-0.05, 0.05)
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.25, 1.0)  # voxels, drawn per axis
    noise_prob: float = 0.3
    noise_std: float = 0.02  # the sample's std is drawn from [0, this), as MONAI's sample_std


DEFAULT = Ranges()

# The families `data.augment_families` names, each with the probabilities that switch it on. Flips
# mirror anatomy (left/right, head/feet), which a brain never shows; the MRI families imitate what differs
# between scanners and subjects: coil bias fields, contrast (gamma), resolution (blur), noise.
FAMILIES = {"flip": ("flip_prob",), "affine": ("affine_prob",),
            "intensity": ("intensity_scale_prob", "shift_prob"), "gamma": ("gamma_prob",),
            "bias_field": ("bias_prob",), "blur": ("blur_prob",), "noise": ("noise_prob",)}


def configured_ranges(overrides: dict[str, Any], base: Ranges = DEFAULT) -> Ranges:
    """`base` with `data.augment_ranges` applied: probabilities in [0, 1], magnitudes >= 0, (low, high)
    pairs with low <= high; anything else is a ConfigError naming the key."""
    fields = {f.name: f for f in dataclasses.fields(Ranges)}
    values = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"data.augment_ranges: unknown '{key}' (known: {', '.join(fields)})")
        values[key] = _checked_range(key, value, fields[key].type)
    return dataclasses.replace(base, **values)


def _checked_range(key: str, value: Any, hint: str) -> Any:
    def fail(rule: str) -> typing.NoReturn:
        raise ConfigError(f"data.augment_ranges.{key} must be {rule}, got {value!r}")

    signed = key == "bias_coeff"  # log-field coefficients take either sign; every other magnitude is >= 0

    def number(v: Any) -> float:
        finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not finite or (v < 0 and not signed):
            where = " in each of [low, high]" if pair else ""
            fail("a finite number" + ("" if signed else " >= 0") + where)
        return float(v)

    pair = "tuple" in hint
    if pair:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            fail("a pair [low, high]")
        low, high = number(value[0]), number(value[1])
        if low > high:
            fail("a pair with low <= high")
        return (low, high)
    if hint == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
            fail("an integer from 0 to 5")
        return value
    checked = number(value)
    if key.endswith("_prob") and checked > 1:
        fail("a probability in [0, 1]")
    return checked


def ranges_of(data: Any) -> Ranges:
    """The ranges a `data:` config section asks for: its `augment_ranges` over the defaults, with the
    families it does not name switched off."""
    return ranges_for(data.augment_families, configured_ranges(data.augment_ranges))


def ranges_for(families: Sequence[str], base: Ranges = DEFAULT) -> Ranges:
    """`base` with every family that `families` does not name switched off (probability 0). The draws
    stay the same sequence whatever is switched off, so the named families see the same parameters."""
    unknown = [name for name in families if name not in FAMILIES]
    if unknown:
        raise ConfigError(f"data.augment_families: unknown {unknown} (known: {', '.join(FAMILIES)})")
    return dataclasses.replace(base, **{prob: 0.0 for name, probs in FAMILIES.items() if name not in families
                                        for prob in probs})
TRUNCATED = 4.0  # Gaussian kernels reach 4 sigma, as MONAI's GaussianSmooth


# ---- parameters ---------------------------------------------------------------------------------


def bias_terms(degree: int) -> list[tuple[int, int, int]]:
    """(i, j, k) Legendre orders with i + j + k ≤ degree, in the order MONAI assigns its coefficients."""
    return [(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i)
            for k in range(degree + 1 - i - j)]


def draw(n: int, generator: torch.Generator, ranges: Ranges = DEFAULT) -> dict[str, torch.Tensor]:
    """Per-sample parameters of n crops: a fixed sequence of draws, whatever gets applied."""
    device = generator.device

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator, device=device)

    def chosen(prob: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) < prob

    r = ranges
    return {
        "flip": torch.rand(n, 3, generator=generator, device=device) < r.flip_prob,
        "affine_on": chosen(r.affine_prob), "rotate": uniform(-r.rotate, r.rotate, 3),
        "scale": 1.0 + uniform(-r.scale, r.scale, 3), "translate": uniform(-r.translate, r.translate, 3),
        "factor": torch.where(chosen(r.intensity_scale_prob),
                              1.0 + uniform(-r.intensity_scale, r.intensity_scale), 1.0),
        "shift": torch.where(chosen(r.shift_prob), uniform(-r.shift, r.shift), 0.0),
        "gamma_on": chosen(r.gamma_prob), "gamma": uniform(*r.gamma),
        "bias_on": chosen(r.bias_prob), "bias": uniform(*r.bias_coeff, len(bias_terms(r.bias_degree))),
        "blur_on": chosen(r.blur_prob), "sigma": uniform(*r.blur_sigma, 3),
        "noise_on": chosen(r.noise_prob), "noise_std": uniform(0.0, r.noise_std),
    }


# ---- the families, each on a batch of crops (n, C, D, H, W) ---------------------------------------


def affine_matrices(rotate: torch.Tensor, scale: torch.Tensor, translate: torch.Tensor) -> torch.Tensor:
    """(n, 4, 4) maps from output to input voxel coordinates (centred), in array axis order, composed as
    MONAI's Affine: rotations about axes 0, 1, 2 (intrinsic, `create_rotate`'s "XYZ") @ translate @ scale."""
    n, device = rotate.shape[0], rotate.device
    eye = torch.eye(4, device=device).expand(n, 4, 4)
    matrix = eye.clone()
    for axis in range(3):
        a, b = [d for d in range(3) if d != axis]
        cos, sin = rotate[:, axis].cos(), rotate[:, axis].sin()
        turn = eye.clone()
        turn[:, a, a], turn[:, b, b] = cos, cos
        # MONAI's sign convention: about axis 1 the sine terms are mirrored
        turn[:, a, b], turn[:, b, a] = (sin, -sin) if axis == 1 else (-sin, sin)
        matrix = matrix @ turn
    shift = eye.clone()
    shift[:, :3, 3] = translate
    zoom = torch.diag_embed(torch.cat([scale, torch.ones(n, 1, device=device)], dim=1))
    return matrix @ shift @ zoom


def affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample every crop through its matrix: one affine_grid + grid_sample (bilinear, zeros outside)."""
    spatial = torch.tensor(x.shape[2:], dtype=x.dtype, device=x.device)
    half = spatial / 2  # grid_sample's normalised coordinates (align_corners=False) are voxels / half
    linear = matrices[:, :3, :3].to(x.dtype) * half.view(1, 1, 3) / half.view(1, 3, 1)
    offset = matrices[:, :3, 3].to(x.dtype) / half
    flip = torch.arange(2, -1, -1, device=x.device)  # grids list (W, H, D), arrays (D, H, W)
    theta = torch.cat([linear[:, flip][:, :, flip], offset[:, flip, None]], dim=2)
    return F.grid_sample(x, sampling_grid(theta, x.shape[2:]), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def sampling_grid(theta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`F.affine_grid(theta, (n, C, *shape), align_corners=False)` built from three per-axis terms by
    broadcasting: the same grid, but a few passes over it instead of a (D·H·W × 4) @ (4 × 3) product per
    crop, which costs as much as the resampling itself on a CPU."""
    depth, height, width = shape

    def term(column: int, size: int) -> torch.Tensor:  # (n, size, 3): voxel centres in [-1, 1], as torch
        centres = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1
        return centres.view(1, size, 1) * theta[:, None, :, column]

    x, y, z = term(0, width), term(1, height), term(2, depth) + theta[:, None, :, 3]
    return z[:, :, None, None] + y[:, None, :, None] + x[:, None, None, :]


def adjust_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI AdjustContrast per crop: rescale to [0, 1] by the crop's own range, ** gamma, back."""
    flat = x.flatten(1)
    low = flat.amin(1).view(-1, 1, 1, 1, 1)
    span = flat.amax(1).view(-1, 1, 1, 1, 1) - low
    return ((x - low) / (span + 1e-7)).pow(gamma.view(-1, 1, 1, 1, 1)) * span + low


def legendre(points: torch.Tensor, degree: int) -> torch.Tensor:
    """(len(points), degree + 1): P_0 … P_degree at `points` (Bonnet's recursion)."""
    polys = [torch.ones_like(points), points]
    for order in range(1, degree):
        polys.append(((2 * order + 1) * points * polys[order] - order * polys[order - 1]) / (order + 1))
    return torch.stack(polys[: degree + 1], dim=1)


def bias_field(x: torch.Tensor, coeff: torch.Tensor, degree: int = DEFAULT.bias_degree) -> torch.Tensor:
    """x · exp(Σ c_ijk P_i(u) P_j(v) P_k(w)) on [-1, 1]³, MONAI RandBiasField's field."""
    n = x.shape[0]
    full = torch.zeros(n, degree + 1, degree + 1, degree + 1, dtype=x.dtype, device=x.device)
    i, j, k = (torch.tensor(t, device=x.device) for t in zip(*bias_terms(degree), strict=True))
    full[:, i, j, k] = coeff.to(x.dtype)
    bases = [legendre(torch.linspace(-1.0, 1.0, size, dtype=x.dtype, device=x.device), degree)
             for size in x.shape[2:]]
    log_field = torch.einsum("nijk,ai,bj,ck->nabc", full, *bases)
    return x * log_field.exp().unsqueeze(1)


def gaussian_kernels(sigma: torch.Tensor, tail: int) -> torch.Tensor:
    """(n, 2·tail + 1) MONAI 'erf' kernels (the Gaussian integrated over each voxel), zero past each
    sigma's own reach so that a shared width leaves every kernel as MONAI cuts it."""
    offsets = torch.arange(-tail, tail + 1, dtype=sigma.dtype, device=sigma.device)
    t = 0.70710678 / sigma.abs().unsqueeze(1)
    kernel = (0.5 * ((t * (offsets + 0.5)).erf() - (t * (offsets - 0.5)).erf())).clamp(min=0)
    reach = (torch.clamp(sigma * TRUNCATED, min=0.5) + 0.5).floor().unsqueeze(1)
    kernel = torch.where(offsets.abs() <= reach, kernel, 0.0)
    return kernel / kernel.sum(dim=1, keepdim=True)


def blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float = DEFAULT.blur_sigma[1]) -> torch.Tensor:
    """Separable Gaussian smoothing, each crop with its own sigma per axis (zero padding, as MONAI):
    one grouped convolution per axis for the whole batch."""
    n, c = x.shape[:2]
    tail = int(max(sigma_max * TRUNCATED, 0.5) + 0.5)
    out = x.reshape(1, n * c, *x.shape[2:])
    for axis in range(3):
        kernel = gaussian_kernels(sigma[:, axis].to(x.dtype), tail).repeat_interleave(c, dim=0)
        shape = [n * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * tail + 1
        padding = [0] * 6  # F.pad lists the last axis first; padding first is faster than conv3d's own
        padding[2 * (2 - axis):2 * (2 - axis) + 2] = [tail, tail]
        out = F.conv3d(F.pad(out, padding), kernel.view(shape), groups=n * c)
    return out.reshape(x.shape)


def add_noise(x: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + noise * std.view(-1, 1, 1, 1, 1).to(x.dtype)


# ---- the batch ----------------------------------------------------------------------------------


def on_subset(x: torch.Tensor, chosen: torch.Tensor, transform: Callable[..., torch.Tensor],
              *per_sample: torch.Tensor) -> torch.Tensor:
    """`transform` applied to the chosen crops only (the others pass untouched, bit for bit)."""
    index = chosen.nonzero().squeeze(1).to(x.device)
    if index.numel() == 0:
        return x
    return x.index_copy(0, index, transform(x[index], *[p[index] for p in per_sample]))


def augment(x: torch.Tensor, params: dict[str, torch.Tensor], generator: torch.Generator | None = None,
            ranges: Ranges = DEFAULT, carried: int = 0) -> torch.Tensor:
    """The augmented batch: flips, affine, intensity scale and shift, gamma, bias field, blur, noise
    (MONAI's order: spatial first, noise last). `generator` draws the noise. Each family runs on its
    chosen crops alone, so the flags are needed on the host: parameters drawn there (as `prepare` does)
    cost no device sync; parameters drawn on the device are read back once. The last `carried` channels
    (a target aligned with the image) go through the flips and the affine only."""
    names = ("affine_on", "gamma_on", "bias_on", "blur_on", "noise_on")
    flags = torch.cat([params["flip"], torch.stack([params[k] for k in names], dim=1)], dim=1)
    flags = flags if flags.device.type == "cpu" else flags.cpu()
    host = {"flip": flags[:, :3], **{k: flags[:, 3 + i] for i, k in enumerate(names)}}  # one transfer
    params = {key: value.to(x.device, non_blocking=True) for key, value in params.items()}
    for axis in range(3):
        x = on_subset(x, host["flip"][:, axis], lambda crops, d=axis: crops.flip(2 + d))
    matrices = affine_matrices(params["rotate"], params["scale"], params["translate"])
    x = on_subset(x, host["affine_on"], affine, matrices)
    if carried:
        image, aligned = x.split([x.shape[1] - carried, carried], dim=1)
        return torch.cat([intensity(image, params, host, generator, ranges), aligned], dim=1)
    return intensity(x, params, host, generator, ranges)


def intensity(x: torch.Tensor, params: dict[str, torch.Tensor], host: dict[str, torch.Tensor],
              generator: torch.Generator | None, ranges: Ranges) -> torch.Tensor:
    """`augment`'s intensity families, on the device-side `params` and the host-side flags `host`."""
    factor, shift = (params[k].view(-1, 1, 1, 1, 1).to(x.dtype) for k in ("factor", "shift"))
    x = x * factor + shift
    x = on_subset(x, host["gamma_on"], adjust_contrast, params["gamma"])
    x = on_subset(x, host["bias_on"], lambda c, k: bias_field(c, k, ranges.bias_degree), params["bias"])
    x = on_subset(x, host["blur_on"], lambda c, s: blur(c, s, ranges.blur_sigma[1]), params["sigma"])
    if generator is not None:
        x = on_subset(x, host["noise_on"], lambda c, s: add_noise(c, s, generator), params["noise_std"])
    return x


def to_float(batch: dict) -> dict:
    """Stored crops (with `intensity` = per-crop (scale, offset) and `<view>_valid` boxes) → float32
    normalised intensity, zero outside the volume; batches already in float pass through."""
    if "intensity" not in batch:
        return batch
    out = dict(batch)
    intensity = out.pop("intensity").to(torch.float32)
    scale, offset = (intensity[:, i].view(-1, 1, 1, 1, 1) for i in (0, 1))
    for view in VIEWS:
        if view not in out:
            continue
        box = out.pop(f"{view}_valid")
        image = out[view].to(torch.float32) * scale + offset  # float32 product, then sum: as read_crop
        out[view] = image.masked_fill_(~inside(box, image.shape[2:]), 0.0)
    if "target" in out:  # stored as float, zero outside the volume already
        out["target"] = out["target"].to(torch.float32)
    return out


def inside(box: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(n, 1, D, H, W) bool: voxels within each crop's [lo, hi) box per axis."""
    axes = []
    for axis, size in enumerate(shape):
        position = torch.arange(size, device=box.device)
        axes.append((position >= box[:, axis, :1]) & (position < box[:, axis, 1:]))  # (n, size)
    return (axes[0][:, :, None, None] & axes[1][:, None, :, None] & axes[2][:, None, None, :]).unsqueeze(1)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (pinned host memory lets the copy run asynchronously); the rest as is."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def prepare(batch: dict, cfg: Config, rank: int, step: int, device: torch.device | str,
            micro_step: int = 0) -> dict:
    """One loader batch → the method's batch on `device`: float views, augmented there when
    `data.augment_on=device`, each view with its own draws from the step's AUGMENT generator."""
    batch = to_float(to_device(batch, torch.device(device)))
    if not (cfg.data.augment and cfg.data.augment_on == "device"):
        return batch
    # Parameters are drawn on the host (a few numbers per crop; the host must know which crops each
    # family touches, and reading flags back from the device would stall it every step); the noise is
    # drawn on the device. Both generators are seeded by the step's position.
    host = rng.step_generator(cfg.train.seed, rank, step, "cpu", rng.AUGMENT, micro_step)
    generator = rng.step_generator(cfg.train.seed, rank, step, device, rng.AUGMENT, micro_step)
    ranges = ranges_of(cfg.data)
    for view in VIEWS:
        if view not in batch:
            continue
        params = draw(batch[view].shape[0], host, ranges)
        aligned = aligned_with(batch, cfg) if view == "image" else {}
        if not aligned:
            batch[view] = augment(batch[view], params, generator, ranges)
            continue
        # what is aligned with the image takes its flips and affine only, carried as extra channels
        pieces = [batch[view], *aligned.values()]
        both = augment(torch.cat(pieces, dim=1), params, generator, ranges,
                       carried=sum(t.shape[1] for t in pieces[1:]))
        batch[view], *moved = both.split([t.shape[1] for t in pieces], dim=1)
        batch.update(zip(aligned, moved, strict=True))
    return batch


def aligned_with(batch: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """Arrays that follow the `image` view through the spatial augmentation only: a derived dataset's
    `target`, and with `data.clean_view` the image itself, as `image_clean` (the restoration target)."""
    aligned = {"target": batch["target"]} if "target" in batch else {}
    if cfg.data.clean_view:
        aligned["image_clean"] = batch["image"]
    return aligned


def on_device(batches: Iterator[dict], cfg: Config, rank: int, device: torch.device | str,
              first_step: int = 0) -> Iterator[dict]:
    """The loop's batches through `prepare`: the n-th one serves optimizer step
    first_step + n // grad_accum, micro-step n % grad_accum."""
    accum = cfg.train.grad_accum
    for n, batch in enumerate(batches):
        step, micro_step = divmod(n, accum)
        yield prepare(batch, cfg, rank, first_step + step, device, micro_step)

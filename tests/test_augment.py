"""Device-side augmentation: each batched family equals MONAI's per-crop transform for the same
parameters; identity parameters give the input back; draws are a pure function of the step's position;
stored crops convert to exactly the float32 crops the host would read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, Affine, Flip, GaussianSmooth, RandBiasField

from sslmed.config import Config
from sslmed.data import augment as aug

N, S = 3, 12
ATOL = 1e-4  # float32 grids and kernels computed in another order than MONAI's


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Smooth random crops (n, 1, S, S, S): interpolation differences stay small against the values."""
    x = torch.randn(N, 1, S, S, S, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1) + 1.0


def per_crop(crops: torch.Tensor, transform) -> torch.Tensor:
    return torch.stack([torch.as_tensor(transform(i, crop)).float() for i, crop in enumerate(crops)])


def params(n: int = N, seed: int = 1) -> dict[str, torch.Tensor]:
    return aug.draw(n, torch.Generator().manual_seed(seed), aug.Ranges(translate=2.0))


def test_affine_matches_monai(crops):
    p = params()
    batched = aug.affine(crops, aug.affine_matrices(p["rotate"], p["scale"], p["translate"]))
    reference = per_crop(crops, lambda i, c: Affine(
        rotate_params=p["rotate"][i].tolist(), scale_params=p["scale"][i].tolist(),
        translate_params=p["translate"][i].tolist(), padding_mode="zeros", mode="bilinear",
        image_only=True)(c))
    assert (batched - crops).abs().max() > 0.05  # the parameters do move voxels
    torch.testing.assert_close(batched, reference, atol=ATOL, rtol=0)


def test_sampling_grid_is_torchs_affine_grid():
    theta = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    expected = torch.nn.functional.affine_grid(theta, [2, 1, 5, 6, 7], align_corners=False)
    torch.testing.assert_close(aug.sampling_grid(theta, torch.Size([5, 6, 7])), expected, atol=1e-6, rtol=0)


def test_intensity_families_match_monai(crops):
    p = params()
    gamma = aug.adjust_contrast(crops, p["gamma"])
    torch.testing.assert_close(gamma, per_crop(crops, lambda i, c: AdjustContrast(float(p["gamma"][i]))(c)),
                               atol=ATOL, rtol=0)

    def monai_bias(i, crop):
        transform = RandBiasField(degree=3, prob=1.0)
        transform._do_transform, transform._coeff = True, p["bias"][i].tolist()
        return transform(crop, randomize=False)

    biased = aug.bias_field(crops, p["bias"])
    torch.testing.assert_close(biased, per_crop(crops, monai_bias), atol=ATOL, rtol=0)
    blurred = aug.blur(crops, p["sigma"])
    reference = per_crop(crops, lambda i, c: GaussianSmooth(sigma=p["sigma"][i].tolist())(c))
    torch.testing.assert_close(blurred, reference, atol=ATOL, rtol=0)


def test_batch_matches_monai_per_crop_with_the_same_parameters(crops):
    """The whole chain without noise: MONAI's transforms one crop at a time, applied where chosen."""
    p = params(seed=3)
    p["noise_on"][:] = False
    p["affine_on"][0], p["gamma_on"][1], p["bias_on"][2], p["blur_on"][0] = True, True, True, True

    def chain(i, crop):
        for axis in range(3):
            crop = Flip(spatial_axis=axis)(crop) if p["flip"][i, axis] else crop
        if p["affine_on"][i]:
            crop = Affine(rotate_params=p["rotate"][i].tolist(), scale_params=p["scale"][i].tolist(),
                          translate_params=p["translate"][i].tolist(), padding_mode="zeros",
                          image_only=True)(crop)
        crop = torch.as_tensor(crop) * p["factor"][i] + p["shift"][i]
        if p["gamma_on"][i]:
            crop = AdjustContrast(float(p["gamma"][i]))(crop)
        if p["bias_on"][i]:
            field = RandBiasField(degree=3, prob=1.0)
            field._do_transform, field._coeff = True, p["bias"][i].tolist()
            crop = field(crop, randomize=False)
        if p["blur_on"][i]:
            crop = GaussianSmooth(sigma=p["sigma"][i].tolist())(crop)
        return crop

    torch.testing.assert_close(aug.augment(crops, p), per_crop(crops, chain), atol=ATOL, rtol=0)


def test_identity_parameters_return_the_input_exactly(crops):
    p = params()
    for value in p.values():
        if value.dtype == torch.bool:
            value[:] = False
    p["factor"][:], p["shift"][:] = 1.0, 0.0
    assert torch.equal(aug.augment(crops, p, torch.Generator()), crops)


def test_noise_has_each_crops_drawn_std():
    p = params(n=2)
    p["noise_on"][:] = True
    p["noise_std"] = torch.tensor([0.01, 0.03])
    noisy = aug.add_noise(torch.zeros(2, 1, 32, 32, 32), p["noise_std"], torch.Generator().manual_seed(0))
    np.testing.assert_allclose(noisy.flatten(1).std(1).numpy(), [0.01, 0.03], rtol=0.02)


def stored_batch(seed: int = 0) -> dict:
    """A loader batch as it leaves the loader: int16 views, scale/offset, boxes (one crop padded)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(-1000, 3000, (2, 1, S, S, S), dtype=torch.int16, generator=g)
    image[1, :, S - 2:] = 0  # outside its volume: stored zeros, normalised zeros
    box = torch.tensor([[[0, S]] * 3, [[0, S - 2], [0, S], [0, S]]])
    return {"image": image, "image2": image.flip(2), "intensity": torch.tensor([[1e-3, -0.5], [2e-3, 0.25]]),
            "image_valid": box, "image2_valid": box.clone(), "key": ["a", "b"]}


def augmenting_config(**train) -> Config:
    cfg = Config()
    cfg.train.seed, cfg.train.grad_accum = 5, train.get("grad_accum", 1)
    return cfg


def test_draws_are_a_pure_function_of_seed_rank_step_and_views_differ():
    cfg = augmenting_config()
    a = aug.prepare(stored_batch(), cfg, rank=0, step=7, device="cpu")
    b = aug.prepare(stored_batch(), cfg, rank=0, step=7, device="cpu")
    for view in ("image", "image2"):
        assert a[view].dtype == torch.float32 and torch.equal(a[view], b[view])
    for rank, step in ((0, 8), (1, 7)):
        other = aug.prepare(stored_batch(), cfg, rank, step, "cpu")
        assert not torch.equal(a["image"], other["image"])
    plain = aug.to_float(stored_batch())  # each view has its own draws
    assert not torch.equal(a["image"] - plain["image"], (a["image2"] - plain["image2"]).flip(2))


def test_resumed_stream_reproduces_augmented_batches_bit_exactly():
    cfg = augmenting_config(grad_accum=2)
    straight = list(aug.on_device((stored_batch(i) for i in range(6)), cfg, 0, "cpu"))
    resumed = list(aug.on_device((stored_batch(i) for i in range(4, 6)), cfg, 0, "cpu", first_step=2))
    for x, y in zip(straight[4:], resumed, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["image2"], y["image2"])
    assert not torch.equal(straight[4]["image"], straight[5]["image"])  # micro-steps draw apart


def test_stored_crops_convert_like_the_host_float32_path():
    batch = stored_batch()
    floats = aug.to_float(batch)
    assert set(floats) == {"image", "image2", "key"}
    for i, (scale, offset) in enumerate(batch["intensity"].numpy()):
        expected = batch["image"][i].numpy().astype(np.float32) * np.float32(scale) + np.float32(offset)
        if i == 1:
            expected[:, S - 2:] = 0.0
        np.testing.assert_array_equal(floats["image"][i].numpy(), expected)


def spatial_only(cfg: Config) -> Config:
    """`cfg` with every intensity family switched off: the spatial half of its augmentation."""
    out = Config()
    out.train.seed = cfg.train.seed
    out.data.augment_families = ["flip", "affine"]
    return out


def test_clean_view_is_the_image_through_the_spatial_families_only():
    """`data.clean_view` adds `image_clean`: the same flips and affine as `image` (the same draws), none of
    the intensity families; `image` itself comes out bit for bit as without it."""
    cfg = augmenting_config()
    cfg.data.augment_ranges = {"affine_prob": 1.0, "blur_prob": 1.0, "noise_prob": 1.0}
    plain = aug.prepare(stored_batch(), cfg, rank=0, step=3, device="cpu")
    cfg.data.clean_view = True
    both = aug.prepare(stored_batch(), cfg, rank=0, step=3, device="cpu")
    reference_cfg = spatial_only(cfg)
    reference_cfg.data.augment_ranges = {"affine_prob": 1.0}
    reference = aug.prepare(stored_batch(), reference_cfg, rank=0, step=3, device="cpu")
    assert torch.equal(both["image"], plain["image"]) and torch.equal(both["image2"], plain["image2"])
    assert torch.equal(both["image_clean"], reference["image"])
    assert (both["image"] - both["image_clean"]).abs().mean() > 1e-3  # the intensity families did act
    assert "image2_clean" not in both


def test_clean_view_in_the_loader_matches_monai_spatial_transforms_alone():
    from sslmed.data.stages import augmentation, cut_view

    class Volume:  # the StoredVolume surface cut_view reads
        target = None

        def read_crop(self, start, shape):
            g = np.random.default_rng(0)
            return np.cumsum(g.normal(size=shape), axis=0).astype(np.float32)

    ranges = aug.configured_ranges({"affine_prob": 1.0, "blur_prob": 1.0, "noise_prob": 1.0})
    start = np.zeros(3, dtype=int)
    out = cut_view("image", Volume(), start, S, augmentation(ranges), seed=4, with_clean=True)
    alone = cut_view("image", Volume(), start, S, augmentation(ranges), seed=4)
    spatial = aug.ranges_for(["flip", "affine"], ranges)
    reference = cut_view("image", Volume(), start, S, augmentation(spatial), seed=4)
    np.testing.assert_array_equal(out["image"], alone["image"])
    np.testing.assert_allclose(out["image_clean"], reference["image"], atol=1e-6, rtol=0)
    assert np.abs(out["image"] - out["image_clean"]).mean() > 1e-3

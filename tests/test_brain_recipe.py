"""The brain-MRI recipe's parts: augmentation families, multi-block ViT features, and the shipped
`brain-mri-cpu` config training a few steps and exporting what `sslmed.load_encoder` returns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sslmed
from sslmed.cli import main
from sslmed.config import load_config
from sslmed.data.augment import DEFAULT, FAMILIES, augment, draw, ranges_for, ranges_of
from sslmed.data.stages import augmentation
from sslmed.errors import ConfigError
from sslmed.models.vit3d import ViT3D


def test_augmentation_families_switch_off_every_family_they_do_not_name():
    recipe = load_config("brain-mri-cpu").data.augment_families
    assert "flip" not in recipe
    ranges = ranges_for(recipe)
    probabilities = {name: [getattr(ranges, p) for p in probs] for name, probs in FAMILIES.items()}
    assert probabilities.pop("flip") == [0.0]
    assert all(p > 0 for probs in probabilities.values() for p in probs)
    only_flips = ranges_for(["flip"])
    assert [getattr(only_flips, p) for name, probs in FAMILIES.items() if name != "flip" for p in probs] == \
        [0.0] * 7
    with pytest.raises(ConfigError, match="unknown.*mirror"):
        ranges_for(["mirror"])


def test_augment_ranges_override_the_defaults_on_both_paths():
    """`data.augment_ranges` reaches the device's draws and the loader's MONAI transforms alike; the
    families it does not name keep their defaults, and a family switched off stays off."""
    cfg = load_config("brain-mri-cpu", ["data.augment_ranges={blur_prob: 1.0, blur_sigma: [1.5, 1.5], "
                                        "noise_std: 0.2, flip_prob: 1.0}"])
    ranges = ranges_of(cfg.data)
    assert (ranges.blur_prob, ranges.blur_sigma, ranges.noise_std) == (1.0, (1.5, 1.5), 0.2)
    assert ranges.flip_prob == 0.0  # `flip` is not among the recipe's families
    assert ranges.rotate == DEFAULT.rotate and ranges.gamma == DEFAULT.gamma
    params = draw(64, torch.Generator().manual_seed(0), ranges)
    assert bool(params["blur_on"].all()) and bool((params["sigma"] == 1.5).all())
    assert float(params["noise_std"].max()) > DEFAULT.noise_std
    smooth = next(t for t in augmentation(ranges).transforms if type(t).__name__ == "RandGaussianSmooth")
    assert smooth.prob == 1.0 and tuple(smooth.sigma_x) == (1.5, 1.5)


@pytest.mark.parametrize("ranges, message", [
    ("{blur_prob: 1.5}", "blur_prob must be a probability"),
    ("{blurr: 1}", "unknown 'blurr'"),
    ("{blur_sigma: [2, 1]}", "low <= high"),
    ("{gamma: 0.5}", "a pair"),
    ("{noise_std: -1}", "noise_std must be a finite number >= 0"),
    ("{bias_degree: 2.5}", "bias_degree must be an integer"),
])
def test_bad_augment_ranges_are_refused_when_the_config_loads(ranges, message):
    with pytest.raises(ConfigError, match=message):
        load_config("brain-mri-cpu", [f"data.augment_ranges={ranges}"])


def test_without_flips_a_crop_is_never_mirrored():
    """A left/right-asymmetric crop stays asymmetric the same way under the recipe's augmentation, in the
    loader (MONAI per crop) and on the device (batched)."""
    ranges = ranges_for(["bias_field", "gamma", "blur", "intensity", "noise"])
    crop = np.zeros((1, 16, 16, 16), np.float32)
    crop[0, :8] = 1.0  # bright left half
    transform = augmentation(ranges)
    for seed in range(20):
        transform.set_random_state(seed=seed)
        out = np.asarray(transform(crop))
        assert out[0, :8].mean() > out[0, 8:].mean() + 0.5
    generator = torch.Generator().manual_seed(0)
    batch = torch.from_numpy(crop)[None].repeat(20, 1, 1, 1, 1)
    out = augment(batch, draw(20, generator, ranges), generator, ranges)
    assert bool((out[:, 0, :8].mean(dim=(1, 2, 3)) > out[:, 0, 8:].mean(dim=(1, 2, 3)) + 0.5).all())


def test_multi_block_features_concatenate_the_normalised_pooled_blocks():
    torch.manual_seed(0)
    vit = ViT3D(patch_size=8, dim=24, depth=3, heads=2, feature_blocks=2).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        tokens = vit.embed(x)
        outputs = []
        for block in vit.transformer.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        reference = torch.cat([vit.transformer.norm(t).mean(1) for t in outputs[1:]], dim=1)
        got = vit(x)
    assert got.shape == (2, 48) and vit.feature_dim == 48
    torch.testing.assert_close(got, reference)
    torch.testing.assert_close(got[:, 24:], vit.forward_tokens(x).mean(1))  # the last block as before
    with pytest.raises(ConfigError, match="feature_blocks"):
        ViT3D(patch_size=8, dim=24, depth=3, heads=2, feature_blocks=4)


def test_brain_mri_cpu_trains_a_few_steps_and_exports_multi_block_features(packed_wds, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    code = main(["pretrain", "brain-mri-cpu", f"run.dir={run}", f"data.path={packed_wds}", "train.steps=2",
                 "train.micro_batch=2", "data.crops_per_volume=2", "data.workers=0", "checkpoint.every=0"])
    assert code == 0
    cfg = load_config("brain-mri-cpu")
    info = json.loads((run / "encoder.json").read_text())
    assert info["kwargs"]["feature_blocks"] == cfg.model.feature_blocks == 4
    encoder = sslmed.load_encoder(run / "encoder.safetensors")
    size = info["crop_size"]
    with torch.no_grad():
        features = encoder(torch.rand(2, 1, size, size, size))
    assert features.shape == (2, cfg.model.feature_blocks * cfg.model.dim)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2

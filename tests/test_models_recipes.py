"""Model pieces of the paper recipes: the CAE's dense bottleneck, the MONAI ResNet backbone and its U-Net,
the residual target against numpy/scipy, and the multi-branch fusion classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter as scipy_median
from torch import nn

from sslmed.errors import ConfigError
from sslmed.models import BACKBONES, CNN3D, ViT3D, rebuild_backbone, set_activation_checkpointing
from sslmed.models.cae import ConvAutoencoder3D
from sslmed.models.fusion import FusionClassifier
from sslmed.models.residual_target import percentile, residual_target
from sslmed.models.resnet3d import ResNet3D, ResUNet3D

torch.set_num_threads(1)


@pytest.mark.parametrize("latent", [512, 48])
def test_cae_code_is_a_dense_vector_of_the_configured_size(latent):
    torch.manual_seed(0)
    cae = ConvAutoencoder3D(crop_size=32, latent_dim=latent).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    code = cae.encode(x)
    assert code.shape == (2, latent)
    assert torch.equal(cae.decode(code), cae(x))  # the decoder sees nothing but the dense code
    strided = [m for m in cae.down.modules() if isinstance(m, nn.Conv3d) and m.stride == (2, 2, 2)]
    assert [(m.out_channels, m.kernel_size) for m in strided] == [(c, (5, 5, 5)) for c in (16, 32, 64)]
    assert sum(isinstance(m, nn.BatchNorm3d) for m in cae.down.modules()) == 3
    assert cae.down[-1].out_channels == 4 and cae.down[-1].kernel_size == (1, 1, 1)
    assert cae.to_code.in_features == 4 * 4**3  # the 4-channel grid at 1/8 of 32³, flattened
    upsamplers = [m for m in cae.up.modules() if isinstance(m, nn.Upsample)]
    assert len(upsamplers) == 3 and all(m.mode == "trilinear" for m in upsamplers)
    with pytest.raises(ConfigError, match="multiple of 8"):
        ConvAutoencoder3D(crop_size=30)
    with pytest.raises(ConfigError, match="32³"):
        cae.encode(torch.rand(1, 1, 16, 16, 16))


def test_resnet18_is_monai_resnet_with_paper_widths_and_rebuilds():
    torch.manual_seed(0)
    encoder = ResNet3D(size="base").eval()
    assert encoder.widths == [64, 128, 256, 512] and encoder.feature_dim == 512
    blocks = [len(stage) for stage in (encoder.net.layer1, encoder.net.layer2, encoder.net.layer3,
                                       encoder.net.layer4)]
    assert blocks == [2, 2, 2, 2]  # ResNet-18
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        maps = encoder.forward_features(x)
        assert [tuple(m.shape[1:]) for m in maps] == [(64, 16, 16, 16), (64, 8, 8, 8), (128, 4, 4, 4),
                                                      (256, 2, 2, 2), (512, 1, 1, 1)]
        assert torch.allclose(encoder(x), encoder.net(x), atol=1e-6)  # MONAI's own forward
        rebuilt = rebuild_backbone(encoder.export_config())
        rebuilt.load_state_dict(encoder.state_dict())
        assert torch.equal(rebuilt.eval()(x), encoder(x))
    assert BACKBONES["resnet3d"] is ResNet3D
    with pytest.raises(ConfigError, match="multiples of 32"):
        encoder(torch.rand(1, 1, 24, 24, 24))


def test_resnet_activation_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    encoder = ResNet3D(size="tiny", dim=8, depth=10).eval()  # eval: BatchNorm statistics stay fixed
    x = torch.rand(1, 1, 32, 32, 32)
    grads, calls = [], []
    encoder.net.layer2.register_forward_pre_hook(lambda *_: calls.append(1))
    for on in (False, True):
        assert set_activation_checkpointing(encoder, on) == 1
        encoder.zero_grad()
        calls.clear()
        encoder(x).square().sum().backward()
        grads.append(encoder.net.layer2[0].conv1.weight.grad.clone())
        assert len(calls) == (2 if on else 1)  # recomputed in backward when checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_resunet_predicts_a_full_resolution_map_through_skips():
    torch.manual_seed(0)
    model = ResUNet3D(ResNet3D(size="tiny", depth=10))
    x = torch.rand(2, 1, 32, 32, 32)
    target = torch.rand(2, 1, 32, 32, 32)
    logits = model(x)
    assert logits.shape == x.shape
    nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    assert model.encoder() is model.backbone and model.backbone.net.conv1.weight.grad.abs().sum() > 0
    # Every decoder level reads the upsampled deeper map concatenated with the encoder map of its scale.
    assert all(fuse.conv.unit0.conv.in_channels == 2 * width
               for fuse, width in zip(model.decoder.fuse, [64, 32, 16, 16], strict=True))


def reference_target(image: np.ndarray, reconstruction: np.ndarray, kernel: int) -> np.ndarray:
    """|x − r|, per-volume 1–99 % percentile rescale clipped to [0, 1], 3-D median filter (edges repeated)."""
    out = np.empty_like(image)
    for b in range(image.shape[0]):
        residual = np.abs(image[b] - reconstruction[b])
        lo, hi = np.percentile(residual, [1, 99])
        scaled = np.clip((residual - lo) / (hi - lo), 0, 1)
        out[b] = scipy_median(scaled, size=(1, kernel, kernel, kernel), mode="nearest")
    return out


def test_residual_target_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    image = rng.random((2, 1, 12, 10, 14)).astype(np.float32)
    reconstruction = (image + rng.normal(0, 0.2, image.shape)).astype(np.float32)
    reconstruction[1] *= 3.0  # a volume with a different residual scale: the rescale is per volume
    target = residual_target(torch.from_numpy(image), torch.from_numpy(reconstruction), kernel_size=5)
    np.testing.assert_allclose(target.numpy(), reference_target(image, reconstruction, 5), atol=1e-5)
    assert target.min() >= 0 and target.max() <= 1  # a valid soft target for BCE-with-logits
    unfiltered = residual_target(torch.from_numpy(image), torch.from_numpy(reconstruction), kernel_size=1)
    assert unfiltered.amax(dim=(1, 2, 3, 4)).tolist() == [1.0, 1.0]
    values = torch.from_numpy(rng.normal(size=(3, 101)))
    for q in (1.0, 37.5, 99.0):
        np.testing.assert_allclose(percentile(values, q).numpy(), np.percentile(values.numpy(), q, axis=1))
    with pytest.raises(ConfigError, match="same"):
        residual_target(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ConfigError, match="odd kernel"):
        residual_target(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), kernel_size=4)


def tiny_encoder(kind: str) -> nn.Module:
    if kind == "vit":
        return ViT3D(size="tiny", patch_size=8, dim=32, depth=1, heads=2)
    return CNN3D(size="tiny", dim=8, depth=1)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("n_branches", [1, 3])
def test_fusion_accepts_n_branches_and_averages_branch_heads(kind, n_branches):
    torch.manual_seed(0)
    encoder = tiny_encoder(kind)
    width = encoder.feature_dim
    x = torch.rand(2, n_branches, 16, 16, 16)
    plain = FusionClassifier(encoder, n_branches, width, 3, cross_attention=False, head="mlp").eval()
    with torch.no_grad():
        out = plain.fuse(x)
        assert out["logits"].shape == (2, 3) and out["branch"].shape == (2, n_branches, 3)
        # Independent reference: each branch's own head on its own encoder's pooled features.
        heads = [plain.branch_heads[i](plain.encoders[i](x[:, i:i + 1])) for i in range(n_branches)]
        assert torch.allclose(out["decision"], torch.stack(heads).mean(0), atol=1e-5)
        assert torch.allclose(out["logits"], (out["feature"] + out["decision"]) / 2)
    assert len(plain.encoders) == n_branches


def test_cross_branch_attention_lets_branches_see_each_other_and_weights_can_be_shared():
    torch.manual_seed(0)
    encoder = tiny_encoder("cnn")
    x = torch.rand(2, 2, 16, 16, 16)
    changed = x.clone()
    changed[:, 1] = torch.rand(2, 16, 16, 16)  # only the second input differs
    for attention, moves in ((False, False), (True, True)):
        model = FusionClassifier(encoder, 2, encoder.feature_dim, 2, cross_attention=attention).eval()
        with torch.no_grad():
            first_branch = model.fuse(x)["branch"][:, 0], model.fuse(changed)["branch"][:, 0]
        assert (not torch.allclose(*first_branch)) == moves
    shared = FusionClassifier(encoder, 3, encoder.feature_dim, 2, shared=True)
    separate = FusionClassifier(encoder, 3, encoder.feature_dim, 2)
    n_encoder = sum(p.numel() for p in encoder.parameters())
    assert (sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
            == 2 * n_encoder)
    with pytest.raises(ConfigError, match="3 branches"):
        shared(torch.rand(1, 2, 16, 16, 16))

"""Backbones: shapes, rebuild from export_config, masking inside the CNN, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from sslmed.config import load_config
from sslmed.errors import ConfigError
from sslmed.models import (
    BACKBONES,
    CNN3D,
    CNNDecoder,
    CondCNN3D,
    ViT3D,
    build_backbone,
    rebuild_backbone,
    set_activation_checkpointing,
)
from sslmed.models.cnn3d import resize_mask
from sslmed.models.vit3d import sincos_pos_embed, to_monai_vit

torch.set_num_threads(1)


def tiny_vit() -> ViT3D:
    return ViT3D(patch_size=4, dim=32, depth=2, heads=4)


def encode(module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, with locations in [-1, 1] for a location-conditioned encoder."""
    if getattr(module, "location_conditioned", False):
        return module(x, torch.linspace(-1, 1, len(x) * 3).view(len(x), 3))
    return module(x)


def test_vit_shapes_and_position_embedding_adapts_to_crop_size() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    assert vit(torch.randn(2, 1, 16, 16, 16)).shape == (2, 32)
    assert vit.forward_tokens(torch.randn(1, 1, 16, 24, 32)).shape == (1, 4 * 6 * 8, 32)
    table = sincos_pos_embed((2, 3, 4), 32)
    assert table.shape == (1, 24, 32)
    assert len({tuple(row.tolist()) for row in table[0]}) == 24  # every position distinct
    assert torch.equal(table[0, :, 30:], torch.zeros(24, 2))  # 32 = 5·6 + 2 padding channels
    assert "pos" not in "".join(vit.state_dict())  # fixed, not saved
    with pytest.raises(ConfigError, match="multiples of the patch size"):
        vit(torch.randn(1, 1, 18, 16, 16))


def test_vit_forward_tokens_computes_only_on_kept_tokens() -> None:
    torch.manual_seed(1)
    vit = tiny_vit()
    x = torch.randn(2, 1, 16, 16, 16)
    seen = []
    vit.transformer.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    ids_keep = torch.tensor([[0, 5, 9], [63, 1, 2]])
    out = vit.forward_tokens(x, ids_keep)
    assert seen == [torch.Size([2, 3, 32])] and out.shape == (2, 3, 32)
    # the kept tokens carry their own position: the same as embedding everything and gathering
    tokens = vit.embed(x)
    expected = vit.transformer(torch.stack([tokens[b, ids_keep[b]] for b in range(2)]))
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("module", [
    lambda: tiny_vit(), lambda: CNN3D(dim=4, depth=1), lambda: CondCNN3D(dim=2, depth=1, experts=2)])
def test_export_config_rebuilds_identical_module(module) -> None:
    torch.manual_seed(2)
    original = module().eval()
    clone = rebuild_backbone(original.export_config()).eval()
    clone.load_state_dict(original.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    assert torch.equal(encode(original, x), encode(clone, x))
    assert encode(original, x).shape == (2, original.feature_dim)
    assert original.export_config()["arch"] in BACKBONES


def test_build_backbone_from_config_and_unknown_arch() -> None:
    cfg = load_config(None, ["model.arch=cnn3d", "model.size=small", "data.crop_size=32"])
    cnn = build_backbone(cfg)
    assert isinstance(cnn, CNN3D) and cnn.widths == [32, 64, 128, 256] and cnn.feature_dim == 256
    cfg = load_config(None, ["model.dim=36", "model.heads=6", "model.depth=1", "model.patch_size=8",
                             "data.crop_size=32"])
    vit = build_backbone(cfg)
    assert (vit.dim, vit.heads, vit.depth, vit.patch_size) == (36, 6, 1, 8)
    with pytest.raises(ConfigError, match="unknown model.arch"):
        build_backbone(cfg, "resnet")
    with pytest.raises(ConfigError, match="unknown backbone"):
        rebuild_backbone({"arch": "nope"})


def test_cnn_masked_features_are_zero_in_masked_cells() -> None:
    torch.manual_seed(3)
    cnn = CNN3D(dim=4, depth=1)
    visible = (torch.rand(2, 1, 4, 4, 4) > 0.5).float()
    features = cnn.forward_features(torch.randn(2, 1, 32, 32, 32), mask=visible)
    assert [f.shape[2] for f in features] == [16, 8, 4, 2]
    for f in features:
        keep = resize_mask(visible, f.shape[2:])
        assert torch.all(f * (1 - keep) == 0)
    # the deepest (2³) grid is masked where any of the four-cell block it covers is masked
    coarse = resize_mask(visible, (2, 2, 2))
    assert torch.equal(coarse[0, 0, 0, 0, 0], visible[0, 0, :2, :2, :2].min())
    with pytest.raises(ConfigError, match="multiples of 16"):
        cnn(torch.randn(1, 1, 24, 24, 24))


def test_cnn_decoder_restores_input_resolution() -> None:
    cnn = CNN3D(dim=4, depth=1)
    for skips in (False, True):
        decoder = CNNDecoder(cnn.widths, out_channels=1, skips=skips)
        assert decoder(cnn.forward_features(torch.randn(1, 1, 32, 32, 32))).shape == (1, 1, 32, 32, 32)


@pytest.mark.parametrize("make", [
    lambda: tiny_vit(), lambda: CNN3D(dim=4, depth=2), lambda: CondCNN3D(dim=2, depth=1, experts=2)])
def test_activation_checkpointing_gives_identical_gradients(make) -> None:
    torch.manual_seed(5)
    model = make()
    x = torch.randn(2, 1, 16, 16, 16)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        encode(model, x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    assert set_activation_checkpointing(model, True) >= 1
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    set_activation_checkpointing(model, False)
    assert not any(getattr(m, "checkpointing", False) for m in model.modules())


def test_monai_vit_conversion_refuses_widths_monai_cannot_embed():
    with pytest.raises(ConfigError, match="divisible by 6"):
        to_monai_vit(ViT3D("tiny", patch_size=4, dim=40, depth=1, heads=4), 8)

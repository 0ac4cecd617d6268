"""Backbones: plain nn.Modules mapping (B, C, D, H, W) to (B, F), rebuilt from `export_config()`."""

from __future__ import annotations

from torch import nn

from sslmed.config import Config
from sslmed.errors import ConfigError
from sslmed.models.cnn3d import CNN3D, CNNDecoder, CodedCNN3D
from sslmed.models.condcnn3d import CondCNN3D
from sslmed.models.resnet3d import ResNet3D
from sslmed.models.vit3d import ViT3D, ViTDecoder

BACKBONES: dict[str, type[nn.Module]] = {"vit3d": ViT3D, "cnn3d": CNN3D, "cnn3d_cond": CondCNN3D,
                                         "resnet3d": ResNet3D, "cnn3d_code": CodedCNN3D}


def backbone_kwargs(cfg: Config) -> dict:
    """Constructor arguments for `cfg.model.arch` taken from the model section."""
    m = cfg.model
    common = {"size": m.size, "in_channels": m.in_channels, "dim": m.dim, "depth": m.depth}
    if m.arch == "vit3d":
        return {**common, "patch_size": m.patch_size, "heads": m.heads, "feature_blocks": m.feature_blocks}
    if m.arch == "cnn3d_cond":
        return {**common, "experts": m.experts}
    return common


def build_backbone(cfg: Config, arch: str | None = None) -> nn.Module:
    """The backbone named by `arch` (default `cfg.model.arch`), sized by `cfg.model`."""
    name = arch or cfg.model.arch
    if name not in BACKBONES:
        raise ConfigError(f"unknown model.arch '{name}' (known: {', '.join(BACKBONES)})")
    kwargs = backbone_kwargs(cfg)
    if name != "vit3d":
        for vit_only in ("patch_size", "heads", "feature_blocks"):
            kwargs.pop(vit_only, None)
    return BACKBONES[name](**kwargs)


def rebuild_backbone(export: dict) -> nn.Module:
    """Inverse of `module.export_config()`."""
    arch = export.get("arch")
    if arch not in BACKBONES:
        raise ConfigError(f"unknown backbone architecture '{arch}' (known: {', '.join(BACKBONES)})")
    return BACKBONES[arch](**export.get("kwargs", {}))


def set_activation_checkpointing(module: nn.Module, on: bool) -> int:
    """Switch recomputation in backward for every part of `module` that supports it; returns how many."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "checkpointing"):
            sub.checkpointing = bool(on)
            count += 1
    return count


__all__ = ["BACKBONES", "CNN3D", "CNNDecoder", "CondCNN3D", "ResNet3D", "ViT3D", "ViTDecoder",
           "build_backbone", "rebuild_backbone", "set_activation_checkpointing"]

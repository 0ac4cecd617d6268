"""3-D residual CNN encoders (MONAI blocks) and a CNN decoder (the location-conditioned DrasCLR encoder
is in condcnn3d.py).

Every encoder has a stride-2 stem and four residual stages (strides 1, 2, 2, 2): features at 1/2, 1/4,
1/8 and 1/16 of the input. `forward_features(x, mask)` can zero masked positions after the stem and
every stage (the mask resized to each stage's grid), which is how masked CNN pretraining keeps
information from leaking out of masked regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch import nn
from torch.utils.checkpoint import checkpoint

from sslmed.errors import ConfigError

# size → (first-stage width, residual units per stage); widths double per stage.
CNN_SIZES = {"tiny": (16, 1), "small": (32, 2), "base": (64, 2)}
DOWNSAMPLE = 16  # stem × stages


def _norm(channels: int) -> tuple:
    return ("group", {"num_groups": min(8, channels)})


ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": False})


def resize_mask(mask: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A 1=visible/0=masked map resized to `size`; when shrinking, a cell is masked if any of it is."""
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    if all(s >= m for s, m in zip(size, mask.shape[2:], strict=True)):
        return F.interpolate(mask, size=size, mode="nearest")
    return 1.0 - F.adaptive_max_pool3d(1.0 - mask, size)


def _widths(size: str, dim: int, depth: int) -> tuple[list[int], int]:
    if size not in CNN_SIZES:
        raise ConfigError(f"unknown CNN size '{size}' (sizes: {', '.join(CNN_SIZES)})")
    base, units = CNN_SIZES[size]
    first = dim or base
    return [first * 2**i for i in range(4)], depth or units


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5 or any(s % DOWNSAMPLE for s in x.shape[2:]):
        raise ConfigError(f"CNN input of shape {tuple(x.shape)}: expected (B, C, D, H, W) with sides "
                          f"that are multiples of {DOWNSAMPLE}")


class CNN3D(nn.Module):
    """(B, C, D, H, W) → (B, F) by global average pooling of the last stage."""

    def __init__(self, size: str = "tiny", in_channels: int = 1, dim: int = 0, depth: int = 0) -> None:
        super().__init__()
        self.widths, self.depth = _widths(size, dim, depth)
        self.size, self.in_channels, self.dim = size, in_channels, self.widths[0]
        self.stem = Convolution(3, in_channels, self.widths[0], strides=2, kernel_size=3,
                                act=ACT, norm=_norm(self.widths[0]))
        self.stages = nn.ModuleList()
        previous = self.widths[0]
        for i, width in enumerate(self.widths):
            units = [ResidualUnit(3, previous if u == 0 else width, width, strides=2 if (i and not u) else 1,
                                  subunits=2, act=ACT, norm=_norm(width)) for u in range(self.depth)]
            self.stages.append(nn.Sequential(*units))
            previous = width
        self.checkpointing = False

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def export_config(self) -> dict:
        return {"arch": "cnn3d", "kwargs": {"size": self.size, "in_channels": self.in_channels,
                                            "dim": self.dim, "depth": self.depth}}

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stage maps at 1/2 … 1/16; with `mask` (B, 1, d, h, w), masked cells are zeroed throughout."""
        _check_input(x)

        def keep(t: torch.Tensor) -> torch.Tensor:
            return t if mask is None else t * resize_mask(mask, t.shape[2:])

        x = keep(self.stem(keep(x)))
        features = []
        for stage in self.stages:
            x = keep(self.run_stage(stage, x))
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].mean(dim=(2, 3, 4))


CODE_SQUEEZE = 16  # channels of the 1/16 map that is flattened into a dense code


class CodedCNN3D(nn.Module):
    """A `CNN3D` whose last map, squeezed by a 1×1 conv and flattened, becomes a dense `code_dim`-d code:
    the representation of an autoencoder whose decoder reads that code (`forward` gives it)."""

    def __init__(self, size: str = "tiny", in_channels: int = 1, dim: int = 0, depth: int = 0,
                 crop_size: int = 32, code_dim: int = 128) -> None:
        super().__init__()
        if crop_size <= 0 or crop_size % DOWNSAMPLE:
            raise ConfigError(f"a dense code needs data.crop_size a multiple of {DOWNSAMPLE}, "
                              f"got {crop_size}")
        self.cnn = CNN3D(size, in_channels, dim, depth)
        self.crop_size, self.code_dim = crop_size, code_dim
        self.grid = (CODE_SQUEEZE, *(crop_size // DOWNSAMPLE,) * 3)
        self.squeeze = nn.Conv3d(self.cnn.widths[-1], CODE_SQUEEZE, kernel_size=1)
        self.to_code = nn.Linear(CODE_SQUEEZE * (crop_size // DOWNSAMPLE) ** 3, code_dim)

    @property
    def widths(self) -> list[int]:
        return self.cnn.widths

    @property
    def feature_dim(self) -> int:
        return self.code_dim

    def export_config(self) -> dict:
        cnn = self.cnn.export_config()["kwargs"]
        return {"arch": "cnn3d_code",
                "kwargs": {**cnn, "crop_size": self.crop_size, "code_dim": self.code_dim}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != (self.crop_size,) * 3:
            raise ConfigError(f"dense-code encoder built for {self.crop_size}³ crops got {tuple(x.shape)}")
        return self.to_code(self.squeeze(self.cnn.forward_features(x)[-1]).flatten(1))


class CNNDecoder(nn.Module):
    """Upsampling decoder from the 1/16 map back to full resolution (transposed convs, MONAI blocks).

    With `skips`, each level also sees the encoder map of its scale (UNet-like); without, it decodes the
    deepest map alone (a plain autoencoder bottleneck).
    """

    def __init__(self, widths: list[int], out_channels: int = 1, skips: bool = False) -> None:
        super().__init__()
        self.skips = skips
        self.ups, self.fuse = nn.ModuleList(), nn.ModuleList()
        deep_to_shallow = widths[::-1]
        for deeper, width in zip(deep_to_shallow[:-1], deep_to_shallow[1:], strict=True):
            self.ups.append(UpSample(3, deeper, width, scale_factor=2, mode="deconv"))
            self.fuse.append(ResidualUnit(3, width * (2 if skips else 1), width, subunits=1,
                                          act=ACT, norm=_norm(width)))
        self.head = nn.Sequential(UpSample(3, widths[0], widths[0], scale_factor=2, mode="deconv"),
                                  nn.Conv3d(widths[0], out_channels, kernel_size=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, fuse, skip in zip(self.ups, self.fuse, features[-2::-1], strict=True):
            x = up(x)
            x = fuse(torch.cat([x, skip], dim=1) if self.skips else x)
        return self.head(x)

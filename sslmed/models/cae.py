"""The stage-1 convolutional autoencoder of CAE-residual self-supervision.

As its authors built it (mtec-tuhh/self-supervised-paranasal-anomaly, models/ae_3D.py): three
[conv 5³ stride 2 → BatchNorm → LeakyReLU] blocks (16/32/64 channels), a 1×1 conv down to 4 channels, a
fully connected **dense bottleneck** (512-d by default), then the mirror image: a dense layer back to the
4-channel grid, a 1×1 conv to 64 channels and three [conv 5³ → BatchNorm → LeakyReLU → trilinear ×2]
blocks (32/16/input channels; the last block keeps its BatchNorm and LeakyReLU, as theirs does). Trained
with L1 on normal volumes only: the tight dense code is what makes it fail on anomalies, so that the
residual |x − CAE(x)| highlights them.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

from sslmed.errors import ConfigError

CAE_WIDTHS = (16, 32, 64)
CAE_SQUEEZE = 4  # channels of the grid that is flattened into the dense bottleneck
CAE_DOWNSAMPLE = 2 ** len(CAE_WIDTHS)


def _down(in_channels: int, out_channels: int) -> nn.Module:
    return Convolution(3, in_channels, out_channels, strides=2, kernel_size=5, norm="batch", act="leakyrelu")


def _up(in_channels: int, out_channels: int) -> nn.Module:
    conv = Convolution(3, in_channels, out_channels, kernel_size=5, norm="batch", act="leakyrelu")
    return nn.Sequential(conv, nn.Upsample(scale_factor=2, mode="trilinear"))


class ConvAutoencoder3D(nn.Module):
    """(B, C, S, S, S) → reconstruction of the same shape through a `latent_dim`-d dense code."""

    def __init__(self, crop_size: int, in_channels: int = 1, latent_dim: int = 512) -> None:
        super().__init__()
        if crop_size % CAE_DOWNSAMPLE or crop_size <= 0:
            raise ConfigError(f"CAE crop size {crop_size}: must be a positive multiple of {CAE_DOWNSAMPLE}")
        if latent_dim <= 0:
            raise ConfigError(f"CAE bottleneck size must be positive, got {latent_dim}")
        self.crop_size, self.latent_dim = crop_size, latent_dim
        self.grid = (CAE_SQUEEZE, *(crop_size // CAE_DOWNSAMPLE,) * 3)
        flat = CAE_SQUEEZE * (crop_size // CAE_DOWNSAMPLE) ** 3
        widths = [in_channels, *CAE_WIDTHS]
        self.down = nn.Sequential(*(_down(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)),
                                  nn.Conv3d(CAE_WIDTHS[-1], CAE_SQUEEZE, kernel_size=1))
        self.to_code = nn.Linear(flat, latent_dim)
        self.from_code = nn.Linear(latent_dim, flat)
        back = widths[::-1]
        self.up = nn.Sequential(nn.Conv3d(CAE_SQUEEZE, CAE_WIDTHS[-1], kernel_size=1),
                                *(_up(a, b) for a, b in zip(back[:-1], back[1:], strict=True)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) dense code."""
        if tuple(x.shape[2:]) != (self.crop_size,) * 3:
            raise ConfigError(f"CAE built for {self.crop_size}³ crops got input of shape {tuple(x.shape)}")
        return self.to_code(self.down(x).flatten(1))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.up(self.from_code(code).view(-1, *self.grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

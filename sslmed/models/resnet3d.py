"""MONAI's 3-D ResNet as an sslmed backbone, and a U-Net on top of it for dense self-supervised targets.

`ResNet3D` is `monai.networks.nets.ResNet` (7³ stride-2 stem, 3³ stride-2 max-pool, four stages of basic
blocks with BatchNorm) with its classifier removed; `forward_features` also returns the maps a U-Net
decoder needs: the stem at 1/2 and the stages at 1/4, 1/8, 1/16 and 1/32 of the input, and with a mask
zeroes the masked cells of every map at least as fine as the mask's grid (SparK's sparse encoding).
`model.size=base` with the default depth is ResNet-18 with widths 64/128/256/512 (the CAE-residual
paper's backbone, and the backbone its SimCLR/BYOL/SimSiam/SparK baselines share); `tiny`/`small` scale
the widths down for CPUs.
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet
from torch import nn
from torch.utils.checkpoint import checkpoint

from sslmed.errors import ConfigError
from sslmed.models.cnn3d import CNNDecoder, resize_mask

RESNET_WIDTHS = {"tiny": 16, "small": 32, "base": 64}  # first-stage width; doubled per stage
RESNET_LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}  # basic blocks per stage
RESNET_DOWNSAMPLE = 32  # stem × max-pool × three strided stages


class ResNet3D(nn.Module):
    """(B, C, D, H, W) → (B, F) by global average pooling of the last stage (as MONAI's ResNet does)."""

    def __init__(self, size: str = "tiny", in_channels: int = 1, dim: int = 0, depth: int = 0) -> None:
        super().__init__()
        if size not in RESNET_WIDTHS:
            raise ConfigError(f"unknown ResNet size '{size}' (sizes: {', '.join(RESNET_WIDTHS)})")
        depth = depth or 18
        if depth not in RESNET_LAYERS:
            raise ConfigError(f"model.depth={depth}: a 3-D ResNet has depth "
                              f"{', '.join(map(str, RESNET_LAYERS))}")
        first = dim or RESNET_WIDTHS[size]
        self.size, self.in_channels, self.dim, self.depth = size, in_channels, first, depth
        self.widths = [first * 2**i for i in range(4)]
        self.net = ResNet(block="basic", layers=RESNET_LAYERS[depth], block_inplanes=self.widths,
                          spatial_dims=3, n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2,
                          feed_forward=False)
        self.checkpointing = False

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def export_config(self) -> dict:
        return {"arch": "resnet3d", "kwargs": {"size": self.size, "in_channels": self.in_channels,
                                               "dim": self.dim, "depth": self.depth}}

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[stem (1/2), stage 1 (1/4), stage 2 (1/8), stage 3 (1/16), stage 4 (1/32)]. With `mask`
        (B, 1, d, h, w; 1 = visible) the input and every map whose grid is at least as fine as the mask's
        have their masked cells zeroed (`visible_at`); coarser maps are computed from those zeroed maps
        only, so no masked content reaches them either."""
        if x.dim() != 5 or any(s % RESNET_DOWNSAMPLE for s in x.shape[2:]):
            raise ConfigError(f"ResNet input of shape {tuple(x.shape)}: expected (B, C, D, H, W) with sides "
                              f"that are multiples of {RESNET_DOWNSAMPLE}")

        def keep(t: torch.Tensor) -> torch.Tensor:
            visible = None if mask is None else visible_at(mask, t.shape[2:])
            return t if visible is None else t * visible

        net = self.net
        stem = keep(net.act(net.bn1(net.conv1(keep(x)))))
        features, x = [stem], net.maxpool(stem)
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            recompute = self.checkpointing and torch.is_grad_enabled()
            x = keep(checkpoint(stage, x, use_reentrant=False) if recompute else stage(x))
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].mean(dim=(2, 3, 4))


def visible_at(mask: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor | None:
    """The 1=visible mask on a map of `size`, or None when that map is coarser than the mask's grid (a
    cell there would straddle visible and masked patches, so it stays as computed)."""
    if any(s < m for s, m in zip(size, mask.shape[2:], strict=True)):
        return None
    return resize_mask(mask, size)


class ResUNet3D(nn.Module):
    """A `ResNet3D` encoder with a U-Net decoder (skip connections at every scale) predicting a dense map.

    `forward(x) -> (B, out_channels, D, H, W)` logits, e.g. of a soft residual target under
    BCE-with-logits; `encoder()` is the backbone that gets exported.
    """

    def __init__(self, encoder: ResNet3D, out_channels: int = 1) -> None:
        super().__init__()
        self.backbone = encoder
        first = encoder.widths[0]
        # The stem (1/2) has the first stage's width: the decoder's levels are [stem, stage 1, …, stage 4].
        self.decoder = CNNDecoder([first, *encoder.widths], out_channels=out_channels, skips=True)

    def encoder(self) -> ResNet3D:
        return self.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone.forward_features(x))

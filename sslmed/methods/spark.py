"""SparK (Tian et al. 2023), the sparse masked-modelling baseline of seed 001, for 3-D CNNs.

Sparse convolution is emulated by zeroing masked positions after the stem and every stage. Before
decoding, each scale's masked positions are filled with that scale's learned mask token and densified
by a convolution; a UNet-like decoder with skips reconstructs per-patch normalised voxels, and the
loss counts masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslmed.config import Config, MethodSettings, setting
from sslmed.methods.base import Method, Needs, ratio_range, step_rng
from sslmed.methods.losses import masked_mse, normalise_patches, patchify, random_grid_mask
from sslmed.methods.resmae import check_cnn_masking
from sslmed.models import build_backbone
from sslmed.models.cnn3d import CNNDecoder, resize_mask


@dataclass
class SparKSettings(MethodSettings):
    mask_ratio: float = setting(0.75, ratio_range, "in (0, 1)")  # fraction of patches hidden


class SparK(Method):
    name = "spark"
    Settings = SparKSettings
    needs = Needs(backbone="cnn3d")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_cnn_masking(cfg, cls.name)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        widths = self.backbone.widths
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.randn(1, w, 1, 1, 1) * 0.02) for w in widths)
        self.densify = nn.ModuleList(nn.Conv3d(w, w, kernel_size=3, padding=1) for w in widths)
        self.decoder = CNNDecoder(widths, cfg.model.in_channels, skips=True)
        self.patch_size, self.mask_ratio = cfg.model.patch_size, self.settings.mask_ratio

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batch["image"]
        visible, mask = random_grid_mask(image, self.patch_size, self.mask_ratio, step_rng(batch))
        features = self.backbone.forward_features(image, mask=visible)
        dense = []
        for feature, token, conv in zip(features, self.mask_tokens, self.densify, strict=True):
            keep = resize_mask(visible, feature.shape[2:])
            dense.append(conv(feature * keep + token * (1.0 - keep)))
        recon = self.decoder(dense)
        target = normalise_patches(patchify(image, self.patch_size))
        loss = masked_mse(patchify(recon, self.patch_size), target, mask)
        return loss, {"loss_recon": loss.detach()}

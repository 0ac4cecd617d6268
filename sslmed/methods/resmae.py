"""Res-MAE (seed 000): masked image modelling with a residual CNN encoder.

Masked patches are zeroed in the input and kept zero after the stem and every stage (the mask resized
to each stage's grid), so the encoder cannot carry information into masked regions; a CNN decoder
reconstructs the volume from the deepest map and the loss counts masked patches only.
"""

from __future__ import annotations

import torch

from sslmed.config import Config
from sslmed.methods.base import Method, require, require_arch
from sslmed.methods.losses import masked_mse, normalise_patches, patchify, random_grid_mask
from sslmed.models import build_backbone
from sslmed.models.cnn3d import DOWNSAMPLE, CNNDecoder


def require_cnn_masking(cfg: Config, method: str) -> None:
    require_arch(cfg, "cnn3d", method)
    p, s = cfg.model.patch_size, cfg.data.crop_size
    require(s % DOWNSAMPLE == 0,
            f"method '{method}': data.crop_size ({s}) must be a multiple of {DOWNSAMPLE}")
    # Masked cells must survive to the deepest (1/16) map, so a mask patch covers whole cells there.
    require(p > 0 and p % DOWNSAMPLE == 0,
            f"method '{method}': model.patch_size ({p}) must be a multiple of {DOWNSAMPLE}, the encoder's "
            f"downsampling, so that masking holds at every stage")
    require(s % p == 0,
            f"method '{method}': data.crop_size ({s}) must be a multiple of model.patch_size ({p})")


class ResMAE(Method):
    name = "resmae"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        require_cnn_masking(cfg, self.name)
        self.backbone = build_backbone(cfg)
        self.decoder = CNNDecoder(self.backbone.widths, cfg.model.in_channels, skips=False)
        self.patch_size, self.mask_ratio = cfg.model.patch_size, cfg.method.mask_ratio

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        image = batch["image"]
        visible, mask = random_grid_mask(image, self.patch_size, self.mask_ratio)
        recon = self.decoder(self.backbone.forward_features(image, mask=visible))
        target = patchify(image, self.patch_size)
        if self.cfg.method.norm_pix_loss:
            target = normalise_patches(target)
        loss = masked_mse(patchify(recon, self.patch_size), target, mask)
        return loss, {"loss_recon": loss.item()}

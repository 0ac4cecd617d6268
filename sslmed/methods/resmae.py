"""Res-MAE (seed 000): masked image modelling with a residual CNN encoder.

Masked patches are zeroed in the input and kept zero after the stem and every stage (the mask resized
to each stage's grid), so the encoder cannot carry information into masked regions; a CNN decoder
reconstructs the volume from the deepest map and the loss counts masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslmed.config import Config, MethodSettings, setting
from sslmed.methods.base import Method, Needs, ratio_range, require, step_rng
from sslmed.methods.losses import masked_mse, normalise_patches, patchify, random_grid_mask
from sslmed.models import build_backbone
from sslmed.models.cnn3d import DOWNSAMPLE, CNNDecoder


def check_cnn_masking(cfg: Config, method: str) -> None:
    p, s = cfg.model.patch_size, cfg.data.crop_size
    require(s % DOWNSAMPLE == 0,
            f"method '{method}': data.crop_size ({s}) must be a multiple of {DOWNSAMPLE}")
    # Masked cells must survive to the deepest (1/16) map, so a mask patch covers whole cells there.
    require(p > 0 and p % DOWNSAMPLE == 0,
            f"method '{method}': model.patch_size ({p}) must be a multiple of {DOWNSAMPLE}, the encoder's "
            f"downsampling, so that masking holds at every stage")
    require(s % p == 0,
            f"method '{method}': data.crop_size ({s}) must be a multiple of model.patch_size ({p})")


@dataclass
class ResMAESettings(MethodSettings):
    mask_ratio: float = setting(0.75, ratio_range, "in (0, 1)")  # fraction of patches hidden
    norm_pix_loss: bool = False  # reconstruct per-patch normalised voxels


class ResMAE(Method):
    name = "resmae"
    Settings = ResMAESettings
    needs = Needs(backbone="cnn3d")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_cnn_masking(cfg, cls.name)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        self.decoder = CNNDecoder(self.backbone.widths, cfg.model.in_channels, skips=False)
        self.patch_size, self.mask_ratio = cfg.model.patch_size, self.settings.mask_ratio

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batch["image"]
        visible, mask = random_grid_mask(image, self.patch_size, self.mask_ratio, step_rng(batch))
        recon = self.decoder(self.backbone.forward_features(image, mask=visible))
        target = patchify(image, self.patch_size)
        if self.settings.norm_pix_loss:
            target = normalise_patches(target)
        loss = masked_mse(patchify(recon, self.patch_size), target, mask)
        return loss, {"loss_recon": loss.detach()}

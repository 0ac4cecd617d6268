"""SparK (Tian et al. 2023), the sparse masked-modelling baseline of seed 001, for 3-D CNNs.

Backbones: the residual CNN (`cnn3d`, masked on its coarsest grid) or MONAI's 3-D ResNet (`resnet3d`,
the CAE-residual paper's ResNet-18 shared with its other baselines; `spark-resnet18`). Sparse
convolution is emulated by zeroing masked positions of the input, the stem and every stage whose grid
resolves the mask. Before decoding, each such scale's masked positions are filled with that scale's
learned mask token, and every scale is densified by a convolution; a UNet-like decoder with skips
reconstructs per-patch normalised voxels, and the loss counts masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslmed.config import Config, MethodSettings, setting
from sslmed.methods.base import Method, Needs, ratio_range, require, step_rng
from sslmed.methods.losses import masked_mse, normalise_patches, patchify, random_grid_mask
from sslmed.methods.resmae import check_cnn_masking
from sslmed.models import build_backbone
from sslmed.models.cnn3d import CNNDecoder
from sslmed.models.resnet3d import RESNET_DOWNSAMPLE, visible_at


@dataclass
class SparKSettings(MethodSettings):
    mask_ratio: float = setting(0.75, ratio_range, "in (0, 1)")  # fraction of patches hidden


class SparK(Method):
    name = "spark"
    Settings = SparKSettings
    needs = Needs(backbone="cnn3d", other_backbones=("resnet3d",))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.arch == "cnn3d":
            check_cnn_masking(cfg, cls.name)
            return
        p, s = cfg.model.patch_size, cfg.data.crop_size
        require(s % RESNET_DOWNSAMPLE == 0,
                f"method 'spark' on resnet3d: data.crop_size ({s}) must be a multiple of {RESNET_DOWNSAMPLE}")
        # A power of two aligns mask cells with every finer map's cells (no patch straddles two).
        require(p >= 2 and p & (p - 1) == 0 and s % p == 0,
                f"method 'spark' on resnet3d: model.patch_size ({p}) must be a power of two >= 2 "
                f"that divides data.crop_size ({s})")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        # The ResNet's stem (1/2) has its first stage's width; its levels are [stem, stage 1, …, stage 4].
        widths = self.backbone.widths
        if cfg.model.arch == "resnet3d":
            widths = [widths[0], *widths]
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
            keep = visible_at(visible, feature.shape[2:])
            dense.append(conv(feature if keep is None else feature * keep + token * (1.0 - keep)))
        recon = self.decoder(dense)
        target = normalise_patches(patchify(image, self.patch_size))
        loss = masked_mse(patchify(recon, self.patch_size), target, mask)
        return loss, {"loss_recon": loss.detach()}

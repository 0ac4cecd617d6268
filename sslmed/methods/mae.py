"""MAE (He et al. 2022) for 3-D: the ViT encoder sees only visible patches; a light decoder fills in."""

from __future__ import annotations

import torch

from sslmed.config import Config
from sslmed.methods.base import Method, require_arch
from sslmed.methods.losses import masked_mse, normalise_patches, patchify, random_masking
from sslmed.models import build_backbone
from sslmed.models.vit3d import ViTDecoder


class MAE(Method):
    name = "mae"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        require_arch(cfg, "vit3d", self.name)
        self.backbone = build_backbone(cfg)
        self.patch_size = self.backbone.patch_size
        self.mask_ratio = cfg.method.mask_ratio
        self.norm_pix_loss = cfg.method.norm_pix_loss
        dim = cfg.method.decoder_dim or max(16, self.backbone.dim // 2)
        self.decoder = ViTDecoder(self.backbone.dim, self.patch_size, cfg.model.in_channels, dim=dim,
                                  depth=cfg.method.decoder_depth or 2, heads=max(1, dim // 32))

    def masked_forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mask, encode the visible tokens, decode all; everything the losses need."""
        grid = self.backbone.grid(image)
        tokens = grid[0] * grid[1] * grid[2]
        ids_keep, mask, ids_restore = random_masking(image.shape[0], tokens, self.mask_ratio, image.device)
        visible = self.backbone.forward_tokens(image, ids_keep)
        pred, latent = self.decoder(visible, ids_restore, grid)
        return {"ids_keep": ids_keep, "mask": mask, "ids_restore": ids_restore, "visible": visible,
                "pred": pred, "latent": latent, "grid": grid}

    def reconstruction_loss(self, image: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        target = patchify(image, self.patch_size)
        if self.norm_pix_loss:
            target = normalise_patches(target)
        return masked_mse(out["pred"], target, out["mask"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.masked_forward(batch["image"])
        loss = self.reconstruction_loss(batch["image"], out)
        return loss, {"loss_recon": loss.item()}

"""MAE (He et al. 2022) for 3-D: the ViT encoder sees only visible patches; a light decoder fills in.

With `data.clean_view` the decoder reconstructs the crop as it was before the intensity augmentation
(`image_clean`: bias field, contrast, blur and noise left out) from the visible patches of the augmented
one, so the encoder must describe the anatomy under those changes rather than the changes themselves
(the restoration pretext of Models Genesis, Zhou et al. 2019, on top of masking). Without it, the
target is the augmented input, and the features must encode its blur, noise and contrast to rebuild it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslmed.config import Config, MethodSettings, setting
from sslmed.methods.base import Method, Needs, non_negative, ratio_range, step_rng
from sslmed.methods.losses import masked_mse, normalise_patches, patchify, random_masking
from sslmed.models import build_backbone
from sslmed.models.vit3d import ViTDecoder


@dataclass
class MAESettings(MethodSettings):
    mask_ratio: float = setting(0.75, ratio_range, "in (0, 1)")  # fraction of patches hidden from the encoder
    norm_pix_loss: bool = False  # reconstruct per-patch normalised voxels
    decoder_dim: int = setting(0, non_negative, ">= 0")  # 0: half the encoder width (at least 16)
    decoder_depth: int = setting(0, non_negative, ">= 0")  # 0: two blocks


class MAE(Method):
    name = "mae"
    Settings = MAESettings
    needs = Needs(backbone="vit3d")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        self.backbone = build_backbone(cfg)
        self.patch_size = self.backbone.patch_size
        self.mask_ratio = s.mask_ratio
        self.norm_pix_loss = s.norm_pix_loss
        dim = s.decoder_dim or max(16, self.backbone.dim // 2)
        self.decoder = ViTDecoder(self.backbone.dim, self.patch_size, cfg.model.in_channels, dim=dim,
                                  depth=s.decoder_depth or 2, heads=max(1, dim // 32))

    def masked_forward(self, image: torch.Tensor, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
        """Mask (drawn from `generator`), encode the visible tokens, decode all; what the losses need."""
        grid = self.backbone.grid(image)
        tokens = grid[0] * grid[1] * grid[2]
        ids_keep, mask, ids_restore = random_masking(image.shape[0], tokens, self.mask_ratio, image.device,
                                                     generator)
        visible = self.backbone.forward_tokens(image, ids_keep)
        pred, latent = self.decoder(visible, ids_restore, grid)
        return {"ids_keep": ids_keep, "mask": mask, "ids_restore": ids_restore, "visible": visible,
                "pred": pred, "latent": latent, "grid": grid}

    def reconstruction_loss(self, image: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        target = patchify(image, self.patch_size)
        if self.norm_pix_loss:
            target = normalise_patches(target)
        return masked_mse(out["pred"], target, out["mask"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.masked_forward(batch["image"], step_rng(batch))
        loss = self.reconstruction_loss(batch.get("image_clean", batch["image"]), out)
        return loss, {"loss_recon": loss.detach()}

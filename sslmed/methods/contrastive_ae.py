"""Contrastive autoencoder (seed 003): a conv autoencoder whose latent is also trained with NT-Xent.

Both views are reconstructed (MSE) from the deepest encoder map; their pooled latents, projected,
form the positive pair of an NT-Xent loss that spreads different crops apart in latent space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslmed.config import Config, setting
from sslmed.methods.base import ContrastiveSettings, Method, Needs, non_negative
from sslmed.methods.losses import nt_xent
from sslmed.models import build_backbone
from sslmed.models.cnn3d import CNNDecoder
from sslmed.models.heads import mlp_head


@dataclass
class ContrastiveAESettings(ContrastiveSettings):
    recon_weight: float = setting(1.0, non_negative, ">= 0")  # reconstruction term
    contrastive_weight: float = setting(1.0, non_negative, ">= 0")  # latent NT-Xent term


class ContrastiveAE(Method):
    name = "contrastive_ae"
    Settings = ContrastiveAESettings
    needs = Needs(views=2, backbone="cnn3d", min_batch=2)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        self.decoder = CNNDecoder(self.backbone.widths, cfg.model.in_channels, skips=False)
        s = self.settings
        self.projector = mlp_head(self.backbone.feature_dim, s.hidden_dim, s.proj_dim)

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(x)
        return self.projector(features[-1].mean(dim=(2, 3, 4))), self.decoder(features)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        x1, x2 = batch["image"], batch["image2"]
        (z1, r1), (z2, r2) = self.encode_decode(x1), self.encode_decode(x2)
        recon = 0.5 * (F.mse_loss(r1, x1) + F.mse_loss(r2, x2))
        contrastive = nt_xent(z1, z2, s.temperature, gather=s.gather)
        loss = s.recon_weight * recon + s.contrastive_weight * contrastive
        return loss, {"loss_recon": recon.detach(), "loss_contrastive": contrastive.detach()}

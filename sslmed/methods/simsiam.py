"""SimSiam (Chen & He 2021): predictor on one branch, stop-gradient on the other, symmetrised."""

from __future__ import annotations

import torch

from sslmed.config import Config
from sslmed.methods.base import TwoViewMethod
from sslmed.methods.losses import negative_cosine
from sslmed.models.heads import mlp_head


class SimSiam(TwoViewMethod):
    name = "simsiam"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        self.predictor = mlp_head(s.proj_dim, s.hidden_dim, s.proj_dim)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = self.project(batch["image"]), self.project(batch["image2"])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)  # in [-1, 1]
        return loss, {"loss_simsiam": loss.detach()}

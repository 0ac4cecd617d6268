"""SimCLR (Chen et al. 2020): NT-Xent between the projections of two views, negatives from all ranks."""

from __future__ import annotations

import torch

from sslmed.methods.base import ContrastiveSettings, TwoViewMethod
from sslmed.methods.losses import nt_xent


class SimCLR(TwoViewMethod):
    name = "simclr"
    Settings = ContrastiveSettings

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = self.project(batch["image"]), self.project(batch["image2"])
        loss = nt_xent(z1, z2, self.settings.temperature, gather=self.settings.gather)
        return loss, {"loss_contrastive": loss.detach()}

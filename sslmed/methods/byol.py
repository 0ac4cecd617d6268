"""BYOL (Grill et al. 2020): online encoder + projector + predictor regress an EMA target's projection."""

from __future__ import annotations

import torch
from torch import nn

from sslmed.config import Config
from sslmed.methods.base import TwoViewMethod, cosine_momentum, ema_update, frozen_copy
from sslmed.methods.losses import negative_cosine
from sslmed.models.heads import mlp_head


class BYOL(TwoViewMethod):
    name = "byol"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        self.predictor = mlp_head(m.proj_dim, m.hidden_dim, m.proj_dim)
        self.target = frozen_copy(nn.ModuleDict({"backbone": self.backbone, "projector": self.projector}))
        self.ema_base = m.ema_momentum
        self.momentum = m.ema_momentum  # the last momentum applied, for logging

    def target_projection(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target["projector"](self.target["backbone"](x))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x1, x2 = batch["image"], batch["image2"]
        p1, p2 = self.predictor(self.project(x1)), self.predictor(self.project(x2))
        t1, t2 = self.target_projection(x1), self.target_projection(x2)
        # 2 − 2·cos per direction, summed over both (the paper's L + L̃), so the loss lies in [0, 8]
        loss = (2 + 2 * negative_cosine(p1, t2)) + (2 + 2 * negative_cosine(p2, t1))
        return loss, {"loss_byol": loss.item(), "ema_momentum": self.momentum}

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.momentum = cosine_momentum(self.ema_base, step, max_steps)
        online = nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})
        ema_update(self.target, online, self.momentum)

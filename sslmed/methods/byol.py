"""BYOL (Grill et al. 2020): online encoder + projector + predictor regress an EMA target's projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslmed.config import Config, setting
from sslmed.methods.base import (
    EMATeacher,
    ProjectionSettings,
    TwoViewMethod,
    cosine_momentum,
    momentum_range,
)
from sslmed.methods.losses import negative_cosine
from sslmed.models.heads import mlp_head


@dataclass
class BYOLSettings(ProjectionSettings):
    ema_momentum: float = setting(0.996, momentum_range, "in [0, 1]")  # target; cosine-scheduled to 1


class BYOL(TwoViewMethod):
    name = "byol"
    Settings = BYOLSettings

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        self.predictor = mlp_head(s.proj_dim, s.hidden_dim, s.proj_dim)
        self.teacher = EMATeacher(self.online())  # the target network, float32 whatever the precision
        self.ema_base = s.ema_momentum
        self.momentum = s.ema_momentum  # the last momentum applied, for logging

    def online(self) -> nn.ModuleDict:
        """The modules the target copies (a view: the same parameters)."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    def target_projection(self, x: torch.Tensor) -> torch.Tensor:
        with self.teacher.applied_to(x) as target:
            return target["projector"](target["backbone"](x))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        x1, x2 = batch["image"], batch["image2"]
        p1, p2 = self.predictor(self.project(x1)), self.predictor(self.project(x2))
        t1, t2 = self.target_projection(x1), self.target_projection(x2)
        # 2 − 2·cos per direction, summed over both (the paper's L + L̃), so the loss lies in [0, 8]
        loss = (2 + 2 * negative_cosine(p1, t2)) + (2 + 2 * negative_cosine(p2, t1))
        return loss, {"loss_byol": loss.detach(), "ema_momentum": self.momentum}

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.momentum = cosine_momentum(self.ema_base, step, max_steps)
        self.teacher.update(self.online(), self.momentum)

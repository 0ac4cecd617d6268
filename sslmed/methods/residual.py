"""Residual learning (seed 001), two stages in one run.

Stage 1 (`method.stage1_steps` steps): a 3-D convolutional autoencoder (CAE, no skips) learns to
reconstruct normal volumes only (samples whose tags match `method.normal_tag`). Stage 2: a frozen
snapshot of the CAE turns every volume into its residual |x − CAE(x)|, a coarse anomaly map, and a
second 3-D CNN (encoder + decoder) learns to predict that residual from x. The stage-2 encoder is the
one exported. The stage follows from `steps_done`, a buffer saved with the state, so resume is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslmed.config import Config
from sslmed.methods.base import Method, frozen_copy, require, require_arch
from sslmed.models import build_backbone
from sslmed.models.cnn3d import CNNDecoder


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    require(bool(sep and key.strip()), f"method.normal_tag must look like key=value, got '{text}'")
    return key.strip(), value.strip()


class Autoencoder(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.decoder = CNNDecoder(self.backbone.widths, cfg.model.in_channels, skips=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone.forward_features(x))


class Residual(Method):
    name = "residual"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        require_arch(cfg, "cnn3d", self.name)
        require(cfg.method.stage1_steps > 0,
                "method 'residual' needs method.stage1_steps > 0 (steps of autoencoder training on "
                "normal volumes before the residual stage)")
        self.normal_key, self.normal_value = parse_tag(cfg.method.normal_tag)
        self.stage1_steps = cfg.method.stage1_steps
        self.cae = Autoencoder(cfg)
        self.residual_net = Autoencoder(cfg)
        # Stage 2 reads this snapshot, taken when stage 1 ends: it is outside the optimizer, so the
        # optimizer's momentum and weight decay cannot move the CAE that defines the targets.
        self.frozen_cae = frozen_copy(self.cae)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def encoder(self) -> nn.Module:
        return self.residual_net.backbone

    @property
    def stage(self) -> int:
        return 1 if int(self.steps_done) < self.stage1_steps else 2

    def is_normal(self, tags: list[dict[str, str]]) -> list[bool]:
        return [str(t.get(self.normal_key)) == self.normal_value for t in tags]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.stage1(batch) if self.stage == 1 else self.stage2(batch)

    def stage1(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        image = batch["image"]
        normal = torch.tensor(self.is_normal(batch["tags"]), device=image.device)
        if not normal.any():
            # Nothing to learn from here, but every rank must still take part in the step.
            loss = sum(p.sum() for p in self.cae.parameters()) * 0.0
            return loss, {"loss_cae": 0.0, "normal_fraction": 0.0, "stage": 1.0}
        x = image[normal]
        loss = F.mse_loss(self.cae(x), x)
        return loss, {"loss_cae": loss.item(), "normal_fraction": normal.float().mean().item(), "stage": 1.0}

    def stage2(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        image = batch["image"]
        with torch.no_grad():
            self.frozen_cae.eval()
            target = (image - self.frozen_cae(image)).abs()
        loss = F.mse_loss(self.residual_net(image), target)
        return loss, {"loss_residual": loss.item(), "stage": 2.0}

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.steps_done += 1
        if int(self.steps_done) == self.stage1_steps:
            with torch.no_grad():
                self.frozen_cae.load_state_dict(self.cae.state_dict())

"""Residual learning (seed 001), two stages in one run.

Stage 1 (`method.stage1_steps` steps): a 3-D convolutional autoencoder (CAE, no skips) learns to
reconstruct normal volumes only (samples whose tags match `method.normal_tag`). Stage 2: a frozen
snapshot of the CAE turns every volume into its residual |x − CAE(x)|, a coarse anomaly map, and a
second 3-D CNN (encoder + decoder) learns to predict that residual from x. The stage-2 encoder is the
one exported. The stage follows from `steps_done`, a buffer saved with the state, so resume is exact;
the host keeps a copy of it, so that choosing the stage never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslmed.config import Config, MethodSettings, setting
from sslmed.methods.base import Method, Needs, frozen_copy, require
from sslmed.models import build_backbone
from sslmed.models.cnn3d import CNNDecoder


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    require(bool(sep and key.strip()), f"method.normal_tag must look like key=value, got '{text}'")
    return key.strip(), value.strip()


@dataclass
class ResidualSettings(MethodSettings):
    # steps of CAE training on normal volumes before the residual stage
    stage1_steps: int = setting(0, lambda v: v > 0, "> 0 (steps of autoencoder training on normal volumes "
                                                    "before the residual stage)")
    normal_tag: str = "status=normal"  # tag=value marking normal volumes

    def check(self) -> None:
        parse_tag(self.normal_tag)


class Autoencoder(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.decoder = CNNDecoder(self.backbone.widths, cfg.model.in_channels, skips=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone.forward_features(x))


class Residual(Method):
    name = "residual"
    Settings = ResidualSettings
    needs = Needs(backbone="cnn3d")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.normal_key, self.normal_value = parse_tag(self.settings.normal_tag)
        self.stage1_steps = self.settings.stage1_steps
        self.cae = Autoencoder(cfg)
        self.residual_net = Autoencoder(cfg)
        # Stage 2 reads this snapshot, taken when stage 1 ends: it is outside the optimizer, so the
        # optimizer's momentum and weight decay cannot move the CAE that defines the targets.
        self.frozen_cae = frozen_copy(self.cae)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.host_steps = 0  # steps_done as the host knows it; re-read when a state is loaded
        self.register_load_state_dict_post_hook(lambda module, _: module.sync_host_steps())

    def sync_host_steps(self) -> None:
        self.host_steps = int(self.steps_done)

    def encoder(self) -> nn.Module:
        return self.residual_net.backbone

    @property
    def stage(self) -> int:
        return 1 if self.host_steps < self.stage1_steps else 2

    def is_normal(self, tags: list[dict[str, str]]) -> list[bool]:
        return [str(t.get(self.normal_key)) == self.normal_value for t in tags]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        return self.stage1(batch) if self.stage == 1 else self.stage2(batch)

    def stage1(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        image = batch["image"]
        normal = [i for i, ok in enumerate(self.is_normal(batch["tags"])) if ok]  # tags live on the host
        fraction = len(normal) / len(image)
        if not normal:
            # Nothing to learn from here, but every rank must still take part in the step.
            loss = sum(p.sum() for p in self.cae.parameters()) * 0.0
            return loss, {"loss_cae": loss.detach(), "normal_fraction": fraction, "stage": 1.0}
        x = image.index_select(0, torch.tensor(normal).to(image.device, non_blocking=True))
        loss = F.mse_loss(self.cae(x), x)
        return loss, {"loss_cae": loss.detach(), "normal_fraction": fraction, "stage": 1.0}

    def stage2(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        image = batch["image"]
        with torch.no_grad():
            self.frozen_cae.eval()
            target = (image - self.frozen_cae(image)).abs()
        loss = F.mse_loss(self.residual_net(image), target)
        return loss, {"loss_residual": loss.detach(), "stage": 2.0}

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.steps_done += 1
        self.host_steps += 1
        if self.host_steps == self.stage1_steps:
            with torch.no_grad():
                self.frozen_cae.load_state_dict(self.cae.state_dict())

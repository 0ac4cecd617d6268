"""SSSD (seed 004): MAE plus self-distillation from the decoder's latent into the encoder's.

The decoder attends over the whole volume (visible tokens and mask tokens); its latent at the visible
positions is the teacher for the encoder's visible tokens (projected to the decoder width), so the
encoder learns what the decoder infers from global context. The teacher is either the same decoder
with the gradient stopped (`method.distill_target: stopgrad`) or an EMA copy of encoder + decoder
(`ema`, momentum cosine-scheduled from `method.ema_momentum` to 1, kept in float32). The teacher
receives no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sslmed.config import Config, setting
from sslmed.methods.base import EMATeacher, cosine_momentum, momentum_range, non_negative, step_rng
from sslmed.methods.losses import negative_cosine
from sslmed.methods.mae import MAE, MAESettings


@dataclass
class SSSDSettings(MAESettings):
    distill_weight: float = setting(1.0, non_negative, ">= 0")  # the self-distillation term's weight
    distill_target: Literal["stopgrad", "ema"] = "stopgrad"  # teacher: the decoder latent, or its EMA copy
    ema_momentum: float = setting(0.996, momentum_range, "in [0, 1]")  # `ema`: cosine-scheduled to 1


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class SSSD(MAE):
    name = "sssd"
    Settings = SSSDSettings

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        decoder_dim = self.decoder.embed.out_features
        self.distill_head = nn.Sequential(nn.Linear(self.backbone.dim, decoder_dim), nn.GELU(),
                                          nn.Linear(decoder_dim, decoder_dim))
        self.distill_weight = s.distill_weight
        self.ema_base = s.ema_momentum
        self.use_ema = s.distill_target == "ema"
        if self.use_ema:
            self.teacher = EMATeacher(self.online())

    def online(self) -> nn.ModuleDict:
        """The modules the EMA teacher copies (a view: the same parameters)."""
        return nn.ModuleDict({"encoder": self.backbone, "decoder": self.decoder})

    def teacher_latent(self, image: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder latent at the visible positions, detached from every gradient path."""
        if not self.use_ema:
            return gather_tokens(out["latent"], out["ids_keep"]).detach()
        with self.teacher.applied_to(image) as teacher:
            visible = teacher["encoder"].forward_tokens(image, out["ids_keep"])
            _, latent = teacher["decoder"](visible, out["ids_restore"], out["grid"])
            return gather_tokens(latent, out["ids_keep"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batch["image"]
        out = self.masked_forward(image, step_rng(batch))
        recon = self.reconstruction_loss(batch.get("image_clean", image), out)  # see methods/mae.py
        student = self.distill_head(out["visible"])
        distill = 1.0 + negative_cosine(student, self.teacher_latent(image, out))  # 1 − cos, in [0, 2]
        loss = recon + self.distill_weight * distill
        return loss, {"loss_recon": recon.detach(), "loss_distill": distill.detach()}

    def on_step_end(self, step: int, max_steps: int) -> None:
        if self.use_ema:
            self.teacher.update(self.online(), cosine_momentum(self.ema_base, step, max_steps))

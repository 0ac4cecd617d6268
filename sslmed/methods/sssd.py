"""SSSD (seed 004): MAE plus self-distillation from the decoder's latent into the encoder's.

The decoder attends over the whole volume (visible tokens and mask tokens); its latent at the visible
positions is the teacher for the encoder's visible tokens (projected to the decoder width), so the
encoder learns what the decoder infers from global context. The teacher is either the same decoder
with the gradient stopped (`method.distill_target: stopgrad`) or an EMA copy of encoder + decoder
(`ema`, momentum cosine-scheduled from `method.ema_momentum` to 1). The teacher receives no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from sslmed.config import Config
from sslmed.methods.base import cosine_momentum, ema_update, frozen_copy
from sslmed.methods.losses import negative_cosine
from sslmed.methods.mae import MAE


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class SSSD(MAE):
    name = "sssd"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        decoder_dim = self.decoder.embed.out_features
        self.distill_head = nn.Sequential(nn.Linear(self.backbone.dim, decoder_dim), nn.GELU(),
                                          nn.Linear(decoder_dim, decoder_dim))
        self.distill_weight = cfg.method.distill_weight
        self.ema_base = cfg.method.ema_momentum
        self.use_ema = cfg.method.distill_target == "ema"
        if self.use_ema:
            self.teacher_encoder = frozen_copy(self.backbone)
            self.teacher_decoder = frozen_copy(self.decoder)

    def teacher_latent(self, image: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder latent at the visible positions, detached from every gradient path."""
        if not self.use_ema:
            return gather_tokens(out["latent"], out["ids_keep"]).detach()
        with torch.no_grad():
            visible = self.teacher_encoder.forward_tokens(image, out["ids_keep"])
            _, latent = self.teacher_decoder(visible, out["ids_restore"], out["grid"])
            return gather_tokens(latent, out["ids_keep"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        image = batch["image"]
        out = self.masked_forward(image)
        recon = self.reconstruction_loss(image, out)
        student = self.distill_head(out["visible"])
        distill = 1.0 + negative_cosine(student, self.teacher_latent(image, out))  # 1 − cos, in [0, 2]
        loss = recon + self.distill_weight * distill
        return loss, {"loss_recon": recon.item(), "loss_distill": distill.item()}

    def on_step_end(self, step: int, max_steps: int) -> None:
        if self.use_ema:
            momentum = cosine_momentum(self.ema_base, step, max_steps)
            ema_update(self.teacher_encoder, self.backbone, momentum)
            ema_update(self.teacher_decoder, self.decoder, momentum)

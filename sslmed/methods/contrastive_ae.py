"""Contrastive autoencoder (seed 003): one dense code is both what the decoder reconstructs from and
what NT-Xent contrasts.

encoder (CNN → 1×1 squeeze → flatten → Linear) → dense code h (`method.code_dim`) → decoder (Linear →
1/16 grid → CNN decoder) and → projector (3-layer MLP, without BatchNorm by default) → z. Loss:
`contrastive_weight` · NT-Xent(z₁, z₂) + `recon_weight` · (MSE₁ + MSE₂), the sum of the two views'
reconstruction losses (the authors' AESIMCLR weights it by 0.1). The exported encoder gives h, so the
cluster evaluation and sampling read the code the decoder consumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslmed.config import Config, setting
from sslmed.methods.base import ContrastiveSettings, Method, Needs, non_negative, positive
from sslmed.methods.losses import nt_xent
from sslmed.models import backbone_kwargs
from sslmed.models.cnn3d import CNNDecoder, CodedCNN3D


@dataclass
class ContrastiveAESettings(ContrastiveSettings):
    code_dim: int = setting(128, positive, "> 0")  # the dense code h the decoder and projector read
    projector_bn: bool = False  # AESIMCLR's projector has no BatchNorm
    recon_weight: float = setting(0.1, non_negative, ">= 0")  # times the sum of both views' reconstruction
    contrastive_weight: float = setting(1.0, non_negative, ">= 0")  # NT-Xent on the projected codes


def projector_mlp(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool) -> nn.Sequential:
    """Three linear layers with ReLUs between them (and BatchNorm before each ReLU if `batch_norm`)."""
    def hidden(width_in: int) -> list[nn.Module]:
        norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        return [nn.Linear(width_in, hidden_dim), *norm, nn.ReLU()]
    return nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, out_dim))


class CodeDecoder(nn.Module):
    """The dense code back to a volume: Linear → the squeezed 1/16 grid → 1×1 conv → CNN decoder."""

    def __init__(self, encoder: CodedCNN3D, out_channels: int) -> None:
        super().__init__()
        self.grid = encoder.grid
        self.from_code = nn.Linear(encoder.code_dim, encoder.to_code.in_features)
        self.unsqueeze = nn.Conv3d(self.grid[0], encoder.widths[-1], kernel_size=1)
        self.levels = len(encoder.widths)
        self.decoder = CNNDecoder(encoder.widths, out_channels, skips=False)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        deepest = self.unsqueeze(self.from_code(code).view(-1, *self.grid))
        # Without skips the decoder reads only the deepest map; the list just has one entry per level.
        return self.decoder([deepest] * self.levels)


class ContrastiveAE(Method):
    name = "contrastive_ae"
    Settings = ContrastiveAESettings
    needs = Needs(views=2, backbone="cnn3d", min_batch=2)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        self.backbone = CodedCNN3D(**backbone_kwargs(cfg), crop_size=cfg.data.crop_size, code_dim=s.code_dim)
        self.decoder = CodeDecoder(self.backbone, cfg.model.in_channels)
        self.projector = projector_mlp(s.code_dim, s.hidden_dim, s.proj_dim, s.projector_bn)

    def decode_code(self, code: torch.Tensor) -> torch.Tensor:
        """Volumes from dense codes (`sslmed sample` draws the codes from a Gaussian fitted on h)."""
        return self.decoder(code)

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projection z, reconstruction) of one view, both from the same code h."""
        code = self.backbone(x)
        return self.projector(code), self.decoder(code)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        x1, x2 = batch["image"], batch["image2"]
        (z1, r1), (z2, r2) = self.encode_decode(x1), self.encode_decode(x2)
        recon = F.mse_loss(r1, x1) + F.mse_loss(r2, x2)
        contrastive = nt_xent(z1, z2, s.temperature, gather=s.gather)
        loss = s.recon_weight * recon + s.contrastive_weight * contrastive
        return loss, {"loss_recon": recon.detach(), "loss_contrastive": contrastive.detach()}

"""DrasCLR (seed 002): anatomy-aware contrastive learning with a location-conditioned encoder.

The encoder's convolution kernels are mixed from experts by the crop's normalised 3-D location. The
local loss contrasts a crop with its anatomical neighbour (a crop displaced by up to
`data.neighbour_shift` voxels, encoded at its own location); the global loss contrasts the larger
region (crop and neighbour features pooled) with a second augmented view of the crop. Each term has
its own projection head and weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslmed.config import Config, setting
from sslmed.methods.base import ContrastiveSettings, Method, Needs, non_negative
from sslmed.methods.losses import nt_xent
from sslmed.models.cnn3d import CondCNN3D
from sslmed.models.heads import mlp_head


@dataclass
class DrasCLRSettings(ContrastiveSettings):
    local_weight: float = setting(1.0, non_negative, ">= 0")  # crop vs. its neighbour
    global_weight: float = setting(1.0, non_negative, ">= 0")  # region vs. a second view


class DrasCLR(Method):
    name = "drasclr"
    Settings = DrasCLRSettings
    needs = Needs(views=2, neighbours=True, backbone="cnn3d", location=True, min_batch=2)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        self.backbone = CondCNN3D(cfg.model.size, cfg.model.in_channels, cfg.model.dim, cfg.model.depth)
        self.local_head = mlp_head(self.backbone.feature_dim, s.hidden_dim, s.proj_dim, s.projector_bn)
        self.global_head = mlp_head(self.backbone.feature_dim, s.hidden_dim, s.proj_dim, s.projector_bn)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        loc, neighbour_loc = batch["location"], batch["neighbour_location"]
        anchor = self.backbone(batch["image"], loc)
        neighbour = self.backbone(batch["neighbour"], neighbour_loc)
        second_view = self.backbone(batch["image2"], loc)
        local = nt_xent(self.local_head(anchor), self.local_head(neighbour), s.temperature, gather=s.gather)
        region = 0.5 * (anchor + neighbour)  # the larger region covered by crop and neighbour
        glob = nt_xent(self.global_head(region), self.global_head(second_view), s.temperature,
                       gather=s.gather)
        loss = s.local_weight * local + s.global_weight * glob
        return loss, {"loss_local": local.detach(), "loss_global": glob.detach()}

"""DrasCLR (seed 002): anatomy-aware contrastive learning with a location-conditioned encoder.

The encoder's convolution kernels are mixed from experts by the crop's normalised 3-D location. The
local loss contrasts a crop with its anatomical neighbour (a crop displaced by up to
`data.neighbour_shift` voxels, encoded at its own location); the global loss contrasts the larger
region (crop and neighbour features pooled) with a second augmented view of the crop. Each term has
its own projection head and weight.
"""

from __future__ import annotations

import torch

from sslmed.config import Config
from sslmed.methods.base import Method, require, require_arch, require_views
from sslmed.methods.losses import nt_xent
from sslmed.models.cnn3d import CondCNN3D
from sslmed.models.heads import mlp_head


class DrasCLR(Method):
    name = "drasclr"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        require_arch(cfg, "cnn3d", self.name)
        require_views(cfg, self.name)
        require(cfg.data.neighbour, "method 'drasclr' contrasts crops with their neighbours: set "
                                    "data.neighbour: true")
        m = cfg.method
        self.backbone = CondCNN3D(cfg.model.size, cfg.model.in_channels, cfg.model.dim, cfg.model.depth)
        self.local_head = mlp_head(self.backbone.feature_dim, m.hidden_dim, m.proj_dim)
        self.global_head = mlp_head(self.backbone.feature_dim, m.hidden_dim, m.proj_dim)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.cfg.method
        loc, neighbour_loc = batch["location"], batch["neighbour_location"]
        anchor = self.backbone(batch["image"], loc)
        neighbour = self.backbone(batch["neighbour"], neighbour_loc)
        second_view = self.backbone(batch["image2"], loc)
        local = nt_xent(self.local_head(anchor), self.local_head(neighbour), m.temperature, gather=m.gather)
        region = 0.5 * (anchor + neighbour)  # the larger region covered by crop and neighbour
        glob = nt_xent(self.global_head(region), self.global_head(second_view), m.temperature,
                       gather=m.gather)
        loss = m.local_weight * local + m.global_weight * glob
        return loss, {"loss_local": local.item(), "loss_global": glob.item()}

"""DrasCLR (seed 002) as its authors built it (batmanlab/DrasCLR): MoCo v2 at one atlas location per batch.

Each batch holds one atlas grid point across subjects (`data.sampling: atlas_grid`). The query encoder
(`CondCNN3D`: every convolution mixed from experts by the location) and its MoCo v2 head embed the anchor
view; a momentum key encoder (an EMA copy, m = 0.999, float32 outside the engine) embeds the second
augmented view. Negatives come from one queue of K keys per grid point, so every negative is another
subject at the same place: the encoder cannot tell crops apart by anatomy and must learn the tissue.

    L_local      = InfoNCE(q, k⁺ = k, negatives = queue[point])
    L_neighbour  = InfoNCE(n, k⁺ = k, negatives = queue[point]),  n = Σ_r normalise(query(neighbour_r))
    loss         = L_local + β · L_neighbour

with the two nearest grid neighbours r encoded by the query encoder at their own locations; summing their
normalised embeddings is how the authors' code forms the neighbour logits (Σ_r r·k and Σ_r r·negative).
After the loss, every rank's keys are gathered and enqueued into the queue of the grid point they came
from. Queues and pointers are float32 / int64 tensors held outside the engine and saved with checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslmed.config import Config, setting
from sslmed.methods.base import (
    EMATeacher,
    Method,
    Needs,
    ProjectionSettings,
    momentum_range,
    non_negative,
    positive,
    require,
)
from sslmed.methods.losses import gather_with_grad, info_nce
from sslmed.models import build_backbone
from sslmed.models.heads import mlp_head

NEIGHBOURS = ("neighbour", "neighbour2")  # the two nearest grid points, as the batch names them


@dataclass
class DrasCLRSettings(ProjectionSettings):
    proj_dim: int = setting(128, positive, "> 0")  # MoCo v2 head: feature → hidden → proj_dim
    hidden_dim: int = setting(128, positive, "> 0")
    projector_bn: bool = False  # MoCo v2's head has no BatchNorm
    temperature: float = setting(0.2, positive, "> 0")
    queue_size: int = setting(4096, positive, "> 0")  # K: keys kept per grid point
    key_momentum: float = setting(0.999, momentum_range, "in [0, 1]")  # the key encoder's EMA
    neighbour_weight: float = setting(1.0, non_negative, ">= 0")  # β
    locations: int = setting(0, non_negative, ">= 0")  # queues; 0: one per grid point of the data


class KeyQueues:
    """One ring of `size` unit-norm keys per location, float32, with a write pointer per location; held
    outside the registered modules (never cast or partitioned by the engine) on the keys' device."""

    def __init__(self, locations: int, size: int, dim: int) -> None:
        # random unit keys to start, as MoCo (the same on every rank: drawn after the weights, seeded alike)
        self.keys = F.normalize(torch.randn(locations, size, dim), dim=2)
        self.pointer = torch.zeros(locations, dtype=torch.long)

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    def to(self, device: torch.device) -> KeyQueues:
        if self.keys.device != device:
            self.keys, self.pointer = self.keys.to(device), self.pointer.to(device)
        return self

    def negatives(self, location: int) -> torch.Tensor:
        """(K, D): a copy of that location's queue (the enqueue after the loss must not change it)."""
        return self.keys[location].clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, location: torch.Tensor, count: torch.Tensor | None = None
                ) -> None:
        """Write the first `count` rows of `keys` (n, D) (all when None) into the ring of `location` from
        its pointer on, wrapping around, the oldest keys overwritten first; advance the pointer by `count`.
        `location` and `count` are (1,) device tensors, so that nothing waits for the host: the rows past
        `count` (padding) rewrite the slots after the new keys with what they hold (n <= size)."""
        n = keys.shape[0]
        rows = torch.arange(n, device=keys.device)
        slots = (self.pointer[location] + rows) % self.size
        new = keys.to(self.keys.dtype)
        if count is not None:
            new = torch.where((rows < count).unsqueeze(1), new, self.keys[location, slots])
        self.keys[location, slots] = new
        self.pointer[location] = (self.pointer[location] + (n if count is None else count)) % self.size

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"queue.keys": self.keys, "queue.pointer": self.pointer}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        keys, pointer = state["queue.keys"], state["queue.pointer"]
        if keys.shape != self.keys.shape or pointer.shape != self.pointer.shape:
            raise ValueError(f"saved key queues of shape {tuple(keys.shape)}, this run keeps "
                             f"{tuple(self.keys.shape)} (grid points, method.queue_size, method.proj_dim)")
        device = self.keys.device
        self.keys = keys.to(device, torch.float32).clone()
        self.pointer = pointer.to(device, torch.long).clone()


class DrasCLR(Method):
    name = "drasclr"
    Settings = DrasCLRSettings
    needs = Needs(views=2, neighbours=True, backbone="cnn3d_cond", location=True, min_batch=2, grid=True)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        self.backbone = build_backbone(cfg)
        self.projector = mlp_head(self.backbone.feature_dim, s.hidden_dim, s.proj_dim, s.projector_bn)
        self.key_encoder = EMATeacher(self.online())
        self.queues = KeyQueues(s.locations or grid_points(cfg), s.queue_size, s.proj_dim)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        s = cfg.method
        require(s.queue_size >= cfg.train.micro_batch,
                f"method.queue_size {s.queue_size} is smaller than one batch of keys (train.micro_batch "
                f"{cfg.train.micro_batch})")

    def online(self) -> nn.ModuleDict:
        """The modules the key encoder copies (a view: the same parameters)."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    def query(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x, location)).float(), dim=1)

    def key(self, x: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        with self.key_encoder.applied_to(x) as encoder:
            return F.normalize(encoder["projector"](encoder["backbone"](x, location)).float(), dim=1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        point = batch["grid_point"][0]  # a host int: the queue is chosen without waiting for the device
        location = batch["location"]
        q = self.query(batch["image"], location)
        k = self.key(batch["image2"], location)
        # both neighbours through the query encoder in one batch (the authors' flattening), then summed
        pairs = self.query(torch.cat([batch[n] for n in NEIGHBOURS]),
                           torch.cat([batch[f"{n}_location"] for n in NEIGHBOURS]))
        neighbours = pairs.view(len(NEIGHBOURS), len(q), -1).sum(dim=0)
        negatives = self.queues.to(q.device).negatives(point)
        local = info_nce(q, k, negatives, s.temperature)
        neighbour = info_nce(neighbours, k, negatives, s.temperature)
        self.enqueue(k, point)
        loss = local + s.neighbour_weight * neighbour
        return loss, {"loss_local": local.detach(), "loss_neighbour": neighbour.detach()}

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, point: int) -> None:
        """Every rank's keys into the queues of the grid points they came from, in rank order. A grid
        batch may be smaller than `train.micro_batch` (subjects without that point): each rank sends its
        keys padded to micro_batch rows with its count, so that the all-gather has one shape everywhere."""
        rows, dim = self.cfg.train.micro_batch, keys.shape[1]
        if len(keys) > rows:
            raise ValueError(f"a batch of {len(keys)} crops is larger than train.micro_batch {rows}")
        padded = torch.cat([keys, keys.new_zeros(rows - len(keys), dim)])
        sent = torch.full((1, 2), len(keys), dtype=torch.long, device=keys.device)  # a fill: no copy
        sent[:, 0] = point
        gathered, meta = gather_with_grad(padded), gather_with_grad(sent)
        for rank in range(len(meta)):
            self.queues.enqueue(gathered[rank * rows:(rank + 1) * rows], meta[rank, :1], meta[rank, 1:])

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.key_encoder.update(self.online(), self.settings.key_momentum)

    def held_state(self) -> dict[str, torch.Tensor]:
        return self.queues.state_dict()

    def load_held_state(self, state: dict[str, torch.Tensor]) -> None:
        self.queues.load_state_dict(state)


def grid_points(cfg: Config) -> int:
    """The number of atlas grid points of the configured data (one queue each)."""
    from sslmed.data.grid import grid_size  # reads the manifest and template: only when asked

    return grid_size(cfg)

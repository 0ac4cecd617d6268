"""DrasCLR's location-conditioned 3-D CNN: every convolution mixes expert kernels by the crop's location.

As the authors built it (batmanlab/DrasCLR, models/cnn3d.py and condconv3d.py): each convolution, the
first included, is a conditional convolution whose kernel for a sample is Σ_e r_e · W_e with routing
weights r = sigmoid(Linear(location)), E experts and one shared bias; each is followed by BatchNorm and
ELU; there are no residual connections. The base network (`size: base`) is the paper's:

    conv 1→8, conv 8→8 /2 | block 8→16 | block 16→32 | block 32→64 | conv 64→128, conv 128→128 /2

where a block is three convolutions, the last of stride 2: a 32³ patch ends as a 1³ map of 128 channels,
the representation. `size: tiny` is the same design narrower (first width 4) and shallower (two
blocks). The representation is the mean of the last map (the authors flatten a 1³ map: the same).

`forward(x, location)`: location (B, 3) in [−1, 1] per axis (atlas coordinates for atlas-packed data).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sslmed.errors import ConfigError

# size → (first width, blocks); widths double per block, the last two convolutions have twice the last
# block's width (base: 8, 8 | 16 | 32 | 64 | 128, 128).
COND_SIZES = {"tiny": (4, 2), "small": (8, 2), "base": (8, 3)}
CONVS_PER_BLOCK = 3
LOCATION_DIMS = 3


class CondConv3d(nn.Module):
    """A 3-D convolution whose kernel is a per-sample mix of `experts` kernels routed by a condition.

    kernel(b) = Σ_e sigmoid(route(cond_b))_e · W_e, one bias shared by all experts; run as one grouped
    convolution over the batch (group b holds sample b with its own kernel)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, experts: int = 8,
                 kernel_size: int = 3, cond_dim: int = LOCATION_DIMS) -> None:
        super().__init__()
        self.stride, self.padding = stride, kernel_size // 2
        self.weight = nn.Parameter(torch.empty(experts, out_channels, in_channels, *(kernel_size,) * 3))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.route = nn.Linear(cond_dim, experts)
        # each expert initialised as nn.Conv3d initialises its kernel and bias
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_channels * kernel_size**3)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def experts(self) -> int:
        return self.weight.shape[0]

    def mixed_kernels(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, out, in, k, k, k): each sample's kernel."""
        routing = torch.sigmoid(self.route(cond.to(self.route.weight.dtype)))  # (B, E)
        return torch.einsum("be,eoikjl->boikjl", routing.to(self.weight.dtype), self.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = self.mixed_kernels(cond).flatten(0, 1).to(x.dtype)  # (B·out, in, k, k, k)
        bias = self.bias.to(x.dtype).repeat(b)
        out = F.conv3d(x.reshape(1, b * c, *x.shape[2:]), weight, bias, stride=self.stride,
                       padding=self.padding, groups=b)
        return out.view(b, -1, *out.shape[2:])


class CondUnit(nn.Module):
    """Conditional convolution → BatchNorm → ELU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, experts: int) -> None:
        super().__init__()
        self.conv = CondConv3d(in_channels, out_channels, stride, experts)
        self.norm = nn.BatchNorm3d(out_channels)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x, cond)))


class CondStage(nn.Module):
    """Units run in sequence, all conditioned on the same location (the unit of activation checkpointing)."""

    def __init__(self, units: list[CondUnit]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x, cond)
        return x


def stage_plan(first: int, blocks: int) -> list[list[tuple[int, int]]]:
    """Per stage, its convolutions as (out channels, stride): a stem of two, `blocks` blocks of three that
    double the width, and a head of two at twice the last block's width."""
    widths = [first * 2 ** (i + 1) for i in range(blocks)]
    plan = [[(first, 1), (first, 2)]]
    plan += [[(w, 1)] * (CONVS_PER_BLOCK - 1) + [(w, 2)] for w in widths]
    head = 2 * (widths[-1] if widths else first)
    plan.append([(head, 1), (head, 2)])
    return plan


class CondCNN3D(nn.Module):
    """The DrasCLR encoder: (B, C, D, H, W) and locations (B, 3) in [−1, 1] → (B, F)."""

    location_conditioned = True  # forward needs each crop's location (export and load_encoder read this)

    def __init__(self, size: str = "tiny", in_channels: int = 1, dim: int = 0, depth: int = 0,
                 experts: int = 8) -> None:
        super().__init__()
        if size not in COND_SIZES:
            raise ConfigError(f"unknown CNN size '{size}' (sizes: {', '.join(COND_SIZES)})")
        if experts < 1:
            raise ConfigError(f"model.experts must be at least 1, got {experts}")
        first, blocks = COND_SIZES[size]
        self.size, self.in_channels, self.experts = size, in_channels, experts
        self.dim, self.depth = dim or first, depth or blocks
        self.stages = nn.ModuleList()
        previous = in_channels
        for convs in stage_plan(self.dim, self.depth):
            units = []
            for width, stride in convs:
                units.append(CondUnit(previous, width, stride, experts))
                previous = width
            self.stages.append(CondStage(units))
        self.widths = [stage.units[-1].conv.weight.shape[1] for stage in self.stages]
        self.checkpointing = False

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def export_config(self) -> dict:
        return {"arch": "cnn3d_cond", "kwargs": {"size": self.size, "in_channels": self.in_channels,
                                                 "dim": self.dim, "depth": self.depth,
                                                 "experts": self.experts}}

    def forward_features(self, x: torch.Tensor, location: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's map; `location` (B, 3) in [−1, 1] conditions every convolution."""
        if location is None:
            raise ValueError("this encoder is location-conditioned: pass each crop's location (B, 3) "
                             "in [-1, 1]")
        if x.dim() != 5 or tuple(location.shape) != (x.shape[0], LOCATION_DIMS):
            raise ValueError(f"expected x (B, C, D, H, W) and location (B, 3), got {tuple(x.shape)} and "
                             f"{tuple(location.shape)}")
        features = []
        for stage in self.stages:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, location, use_reentrant=False)
            else:
                x = stage(x, location)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor, location: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, location)[-1].mean(dim=(2, 3, 4))

    def conditional_convs(self) -> list[CondConv3d]:
        return [m for m in self.modules() if isinstance(m, CondConv3d)]

"""What every method shares: the interface the training loop relies on, EMA helpers, config checks."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sslmed.config import Config
from sslmed.errors import ConfigError
from sslmed.models import build_backbone
from sslmed.models.heads import mlp_head


class Method(nn.Module):
    """`forward(batch) -> (loss, logs)`; `encoder()` is what gets exported; `on_step_end` after each step."""

    name = "method"

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg

    def encoder(self) -> nn.Module:
        return self.backbone

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called by the loop after every optimizer step; methods with a teacher update it here."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def require_arch(cfg: Config, arch: str, method: str) -> None:
    require(cfg.model.arch == arch, f"method '{method}' needs model.arch: {arch} (got '{cfg.model.arch}')")


def require_views(cfg: Config, method: str) -> None:
    require(cfg.data.views == 2, f"method '{method}' compares two views of each crop: set data.views: 2")
    require(cfg.train.micro_batch >= 2,
            f"method '{method}' needs train.micro_batch >= 2 (negatives and batch-normalised heads)")


def cosine_momentum(base: float, step: int, max_steps: int) -> float:
    """BYOL's schedule: `base` at step 0 rising to 1 at `max_steps` along a half cosine."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target ← momentum · target + (1 − momentum) · online, parameters and float buffers alike."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(o)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that takes no gradients (an EMA teacher or a frozen stage)."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class TwoViewMethod(Method):
    """An encoder and a projection MLP applied to `image` and `image2` (SimCLR, BYOL, SimSiam)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        require_views(cfg, self.name)
        self.backbone = build_backbone(cfg)
        self.projector = mlp_head(self.backbone.feature_dim, cfg.method.hidden_dim, cfg.method.proj_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

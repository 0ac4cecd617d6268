"""What every method shares: the contract the training loop relies on, declared needs, EMA teachers.

A method is one file: an `nn.Module` subclass of `Method` with its `name`, its `Settings` (a dataclass of
its own `method.*` keys: defaults, types, ranges) and its `needs` (what it reads from a batch and which
backbone it is built for). `build_method` checks the needs against the config generically.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sslmed.config import Config, MethodSettings, setting
from sslmed.errors import ConfigError
from sslmed.models import build_backbone
from sslmed.models.heads import mlp_head

# The key under which the training loop hands a method its step's torch.Generator (on the step's device,
# seeded from train.seed, rank, step and micro-step). Every random draw in a step comes from it.
RNG = "rng"


@dataclass(frozen=True)
class Needs:
    """What a method reads and is built for; `build_method` checks each against the config."""

    views: int = 1  # 1: `image`; 2: `image` and `image2` (data.views)
    neighbours: bool = False  # `neighbour`, `neighbour_location` (data.neighbour)
    backbone: str = ""  # the model.arch it is built for; "": any backbone in BACKBONES
    other_backbones: tuple[str, ...] = ()  # further model.arch values it is also built for
    location: bool = False  # reads `location` (every batch carries it)
    min_batch: int = 1  # train.micro_batch at least this (negatives, batch-normalised heads)
    grid: bool = False  # batches of one atlas grid point across subjects (data.sampling: atlas_grid)

    def overrides(self) -> list[str]:
        """Dotted overrides that satisfy these needs (benchmarks and tests build configs from them)."""
        out = [f"data.views={self.views}", f"data.neighbour={str(self.neighbours).lower()}"]
        if self.backbone:
            out.append(f"model.arch={self.backbone}")
        if self.grid:
            out.append("data.sampling=atlas_grid")
        return out


class Method(nn.Module):
    """`forward(batch) -> (loss, logs)`; `encoder()` is what gets exported; `on_step_end` after each step.

    `logs` maps names to detached scalar tensors (or plain floats for host-side values): the loop brings
    them to the host only when it logs. Random draws come from `batch[RNG]` (see `step_rng`)."""

    name: ClassVar[str] = "method"
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    needs: ClassVar[Needs] = Needs()

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        if not isinstance(cfg.method, self.Settings):
            raise ConfigError(f"method '{self.name}' got the settings of method '{cfg.method.name}'")
        self.cfg = cfg
        self.settings = cfg.method

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Method-specific constraints beyond `needs` (e.g. crop and patch geometry); raise ConfigError."""

    def encoder(self) -> nn.Module:
        return self.backbone

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called by the loop after every optimizer step; methods with a teacher update it here."""

    def teachers(self) -> dict[str, EMATeacher]:
        """The method's EMA teachers by attribute name (kept in float32 outside the registered modules)."""
        return {key: value for key, value in vars(self).items() if isinstance(value, EMATeacher)}

    def held_state(self) -> dict[str, torch.Tensor]:
        """Other tensors the method keeps outside its registered modules (out of the engine's precision
        and partitioning), e.g. MoCo's key queues: checkpoints save them as they are, on the host."""
        return {}

    def load_held_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `held_state`; a missing or misshapen tensor raises KeyError or ValueError."""
        if state:
            raise KeyError(f"method '{self.name}' holds no state, the checkpoint has {sorted(state)}")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_needs(method: type[Method], cfg: Config) -> None:
    """Each declared need against the data, model and train sections, one line naming the key to set."""
    needs, name = method.needs, method.name
    if needs.backbone:
        allowed = (needs.backbone, *needs.other_backbones)
        require(cfg.model.arch in allowed,
                f"method '{name}' needs model.arch: {' or '.join(allowed)} (got '{cfg.model.arch}')")
    views = "two views" if needs.views == 2 else "one view"
    require(cfg.data.views == needs.views,
            f"method '{name}' reads {views} of each crop: set data.views: {needs.views}")
    reads = "contrasts crops with their neighbours" if needs.neighbours else "reads no neighbour crops"
    require(cfg.data.neighbour == needs.neighbours,
            f"method '{name}' {reads}: set data.neighbour: {str(needs.neighbours).lower()}")
    if needs.grid:
        require(cfg.data.sampling == "atlas_grid",
                f"method '{name}' contrasts subjects at one atlas grid point per batch: set data.sampling: "
                f"atlas_grid (got '{cfg.data.sampling}')")
    require(cfg.train.micro_batch >= needs.min_batch,
            f"method '{name}' needs train.micro_batch >= {needs.min_batch} (negatives and batch-normalised "
            "heads)")
    check_masking(cfg, name)
    method.check_config(cfg)


def check_masking(cfg: Config, method: str) -> None:
    """A masked method must hide at least one patch of each crop and show at least one, or it trains
    nothing (a crop of one patch, or a ratio that rounds to no masked patch)."""
    ratio = getattr(cfg.method, "mask_ratio", None)
    if ratio is None:
        return
    patches = (cfg.data.crop_size // max(cfg.model.patch_size, 1)) ** 3
    masked = round(ratio * patches)
    require(1 <= masked < patches,
            f"method '{method}': method.mask_ratio {ratio} of {patches} patch(es) per crop (data.crop_size "
            f"{cfg.data.crop_size}, model.patch_size {cfg.model.patch_size}) masks {masked}; it must hide at "
            "least one patch and show at least one")


def step_rng(batch: dict) -> torch.Generator | None:
    """The step's generator the loop put in the batch (None outside the loop: the global RNG is used)."""
    return batch.get(RNG)


# ---- settings shared by families ----------------------------------------------------------------


def positive(v: Any) -> bool:
    return v > 0


def non_negative(v: Any) -> bool:
    return v >= 0


@dataclass
class ProjectionSettings(MethodSettings):
    proj_dim: int = setting(128, positive, "> 0")  # projection head output
    hidden_dim: int = setting(512, positive, "> 0")  # projection / prediction head hidden width
    projector_bn: bool = True  # BatchNorm in the projection head's hidden layer


@dataclass
class ContrastiveSettings(ProjectionSettings):
    temperature: float = setting(0.1, positive, "> 0")
    gather: bool = True  # gather negatives across ranks (gradient-preserving)


def momentum_range(v: float) -> bool:
    return 0.0 <= v <= 1.0


def ratio_range(v: float) -> bool:
    return 0.0 < v < 1.0  # 0 would mask nothing: the method would learn nothing and still export


# ---- EMA teachers -------------------------------------------------------------------------------


def cosine_momentum(base: float, step: int, max_steps: int) -> float:
    """BYOL's schedule: `base` at step 0 rising to 1 at `max_steps` along a half cosine."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target ← momentum · target + (1 − momentum) · online, parameters and float buffers alike, in the
    target's precision (the online weights are upcast first)."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach().to(t.dtype), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(o.detach().to(t.dtype), alpha=1.0 - momentum)
        else:
            t.copy_(o)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that takes no gradients (a frozen stage such as the residual method's CAE snapshot)."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class EMATeacher:
    """A float32 EMA copy of online modules, held outside the method's registered modules.

    Not being a submodule, it is never cast by the engine's precision (DeepSpeed turns every registered
    parameter into bf16, where an update of (1 − momentum) · (online − teacher) falls below the
    resolution once momentum nears 1), never partitioned by ZeRO-3 (each rank holds the same replica)
    and not part of the module's state dict: checkpoints save it apart, in float32 (`outside_state`).
    It follows the online modules' device on first use. Its forward autocasts to the input's dtype."""

    def __init__(self, online: nn.Module) -> None:
        self.module = frozen_copy(online).float()

    def _follow(self, device: torch.device) -> None:
        first = next(iter(self.module.parameters()), None)
        if first is not None and first.device != device:
            self.module.to(device)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        self._follow(next(online.parameters()).device)
        ema_update(self.module, online, momentum)

    @contextlib.contextmanager
    def applied_to(self, x: torch.Tensor) -> Iterator[nn.Module]:
        """The teacher module, on `x`'s device, without gradients, under autocast to `x`'s dtype when
        that is a half precision (the weights stay float32; each op casts them as it runs)."""
        self._follow(x.device)
        half = x.dtype in (torch.bfloat16, torch.float16)
        cast = torch.autocast(x.device.type, dtype=x.dtype) if half else contextlib.nullcontext()
        with torch.no_grad(), cast:
            yield self.module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = next(iter(self.module.parameters())).device
        self.module.load_state_dict({k: v.to(device, torch.float32) for k, v in state.items()})


HELD = "held."  # key prefix of a method's held state in `outside_state`


def teachers_of(module: nn.Module) -> dict[str, EMATeacher]:
    """A method's EMA teachers; none for any other module."""
    return module.teachers() if hasattr(module, "teachers") else {}


def outside_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What `module` keeps outside the engine, on the host: every EMA teacher in float32 under
    `teacher.<attribute>.<tensor>`, and the method's held state (`Method.held_state`) under
    `held.<name>`. The same on every rank."""
    teachers = teachers_of(module)
    state = {f"teacher.{attr}.{k}": v for attr, t in teachers.items() for k, v in t.state_dict().items()}
    held = module.held_state() if hasattr(module, "held_state") else {}
    state.update({f"{HELD}{k}": v.detach().to("cpu").clone() for k, v in held.items()})
    return state


def keeps_outside_state(module: nn.Module) -> bool:
    """Whether `module` has teachers or held state (without copying them, as `outside_state` does)."""
    teachers = teachers_of(module)
    return bool(teachers) or bool(module.held_state() if hasattr(module, "held_state") else {})


def load_outside_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `outside_state`; every teacher and the held state must be found, whole."""
    teachers = teachers_of(module)
    for attr, teacher in teachers.items():
        prefix = f"teacher.{attr}."
        teacher.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if hasattr(module, "load_held_state"):
        module.load_held_state({k[len(HELD):]: v for k, v in state.items() if k.startswith(HELD)})


class TwoViewMethod(Method):
    """An encoder and a projection MLP applied to `image` and `image2` (SimCLR, BYOL, SimSiam)."""

    Settings = ProjectionSettings
    needs = Needs(views=2, min_batch=2)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        s = self.settings
        self.projector = mlp_head(self.backbone.feature_dim, s.hidden_dim, s.proj_dim, s.projector_bn)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

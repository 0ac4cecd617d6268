"""Self-supervised methods, picked by name from a plain dict.

Adding a method: one file declaring a `Method` subclass (its `name`, `Settings` and `needs`) and one
entry in `METHODS`. The config's `method:` section is then `name:` plus that method's own settings.
"""

from __future__ import annotations

from torch import nn

from sslmed.config import Config
from sslmed.errors import ConfigError, SslmedError
from sslmed.methods.base import Method, Needs, check_needs
from sslmed.methods.byol import BYOL
from sslmed.methods.contrastive_ae import ContrastiveAE
from sslmed.methods.drasclr import DrasCLR
from sslmed.methods.mae import MAE
from sslmed.methods.residual import Residual
from sslmed.methods.resmae import ResMAE
from sslmed.methods.simclr import SimCLR
from sslmed.methods.simsiam import SimSiam
from sslmed.methods.spark import SparK
from sslmed.methods.sssd import SSSD
from sslmed.models import set_activation_checkpointing

METHODS: dict[str, type[Method]] = {
    "mae": MAE, "resmae": ResMAE, "spark": SparK, "sssd": SSSD, "simclr": SimCLR, "byol": BYOL,
    "simsiam": SimSiam, "drasclr": DrasCLR, "contrastive_ae": ContrastiveAE, "residual": Residual,
}


def build_method(cfg: Config, initialise: bool = True) -> Method:
    """The method named by `cfg.method.name`, its needs checked against the config, its encoder started
    from `model.init` when set (and `initialise`), with activation checkpointing as `train` asks."""
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"unknown method.name '{name}' (known: {', '.join(METHODS)})")
    check_needs(METHODS[name], cfg)
    method = METHODS[name](cfg)
    if cfg.model.init and initialise:
        init_encoder(method.encoder(), cfg.model.init)
    set_activation_checkpointing(method, cfg.train.activation_checkpointing)
    return method


def init_encoder(encoder: nn.Module, path: str) -> None:
    """Copy the weights of the exported encoder at `path` into `encoder`, whose architecture (arch and
    constructor arguments, as `export_config()` states them) must be the export's."""
    from sslmed.train.checkpoint import load_encoder  # checkpoint imports methods.base: import when used

    try:
        exported = load_encoder(path)
    except SslmedError as exc:
        raise ConfigError(f"model.init: {exc}") from None
    have, want = exported.export_config(), encoder.export_config()
    if have != want:
        raise ConfigError(f"model.init: {path} holds a {describe(have)} encoder; this run builds a "
                          f"{describe(want)} one")
    encoder.load_state_dict(exported.state_dict())


def describe(export: dict) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(export.get("kwargs", {}).items()))
    return f"{export.get('arch')} ({kwargs})"


__all__ = ["METHODS", "Method", "Needs", "build_method"]

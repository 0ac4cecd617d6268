"""Encoders called as `encoder(x, location=None)` at the evaluation/API boundary.

A location-conditioned backbone (class attribute `location_conditioned = True`, `forward(x, location)`)
computes different features for the same crop at different places, so downstream code must hand it each
crop's location; calling it without one would silently encode every crop as if at the centre. Other
backbones take no location. `accept_location` gives either kind the same call: a forward pre-hook that,
for a conditioned encoder, refuses a missing location and one outside [−1, 1] (host-side checks, fine
here and kept out of the training forward), and for any other encoder drops the location. The module
itself (its type, state dict and training forward) is unchanged.

Locations are in [−1, 1] per axis, in one of two coordinate systems (encoder.json `location_coordinates`):
`atlas` — the crop centre in the atlas template's millimetres scaled by the template's extent (data packed
with `sslmed pack --atlas`); `volume` — the crop centre scaled by the volume's extent, 2 · centre / shape − 1.
"""

from __future__ import annotations

import torch
from torch import nn

from sslmed.errors import DataError

COORDINATES = {"atlas": "the atlas template's millimetres scaled to [-1, 1] by its extent",
               "volume": "2 * centre / shape - 1 of the crop's own volume"}


def is_location_conditioned(module: nn.Module) -> bool:
    return bool(getattr(module, "location_conditioned", False))


def accept_location(module: nn.Module, coordinates: str = "volume") -> nn.Module:
    """`module`, callable as `module(x, location=None)` with the checks above; returns it."""
    module.location_coordinates = coordinates
    if not hasattr(module, "needs_location"):  # one hook, however often it is asked for
        module.needs_location = is_location_conditioned(module)
        hook = check_location if module.needs_location else drop_location
        module.register_forward_pre_hook(hook, with_kwargs=True)
    return module


def split_location(args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor | None]:
    kwargs = dict(kwargs)
    location = kwargs.pop("location", None)
    if len(args) > 1:
        args, location = args[:1], args[1]
    return args, kwargs, location


def drop_location(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args, kwargs, _ = split_location(args, kwargs)
    return args, kwargs


def check_location(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args, kwargs, location = split_location(args, kwargs)
    coordinates = getattr(module, "location_coordinates", "volume")
    where = COORDINATES.get(coordinates, coordinates)
    if location is None:
        raise DataError(f"this encoder is location-conditioned: pass each crop's location, "
                        f"encoder(x, location) with location (B, 3) in [-1, 1] ({coordinates} coordinates: "
                        f"{where}); without it every crop would be encoded as if at the centre")
    location = torch.as_tensor(location)
    x = args[0]
    if location.shape != (x.shape[0], 3):
        raise DataError(f"location must be (B, 3) = ({x.shape[0]}, 3) for this batch, not "
                        f"{tuple(location.shape)}")
    if not bool(torch.isfinite(location).all()) or float(location.abs().max()) > 1.0:
        raise DataError(f"location outside [-1, 1] (min {float(location.min()):.3g}, max "
                        f"{float(location.max()):.3g}): locations are {coordinates} coordinates, {where}")
    return args, {**kwargs, "location": location.to(x.device, torch.float32)}

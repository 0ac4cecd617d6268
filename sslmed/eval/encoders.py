"""The encoder under evaluation, and batched feature extraction.

`eval.encoder` is an exported encoder (`.safetensors` from `sslmed pretrain`/`sslmed export`), `random`
(the `model` section's architecture at random init: the baseline pretraining has to beat), or
`monai:<network>` (a MONAI network used as a feature extractor, e.g. `monai:resnet10`,
`monai:DenseNet121`). Every one is called as `encoder(x, location=None)` (sslmed/models/location.py): a
location-conditioned encoder gets each sample's location and refuses to run without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslmed.config import Config
from sslmed.errors import CheckpointError, ConfigError, DataError
from sslmed.models.location import accept_location

MONAI_FEATURES = 256  # width of the output layer of MONAI networks that have no feature-only mode


def build_encoder(cfg: Config, seed: int = 0) -> nn.Module:
    """A module mapping (B, 1, S, S, S) to (B, F) features, as named by `cfg.eval.encoder`."""
    spec = cfg.eval.encoder
    torch.manual_seed(seed)  # random and MONAI encoders: the same init for the same seed
    if spec == "random":
        from sslmed.models import build_backbone

        return accept_location(build_backbone(cfg))
    if spec.startswith("monai:"):
        return accept_location(monai_encoder(spec.removeprefix("monai:")))
    if not Path(spec).is_file():
        raise CheckpointError(f"eval.encoder: '{spec}' is not a file (an exported encoder .safetensors), "
                              "'random', or 'monai:<network>'")
    import sslmed

    return sslmed.load_encoder(spec)


def monai_encoder(name: str) -> nn.Module:
    from monai.networks import nets

    factory = getattr(nets, name, None)
    if not callable(factory):
        raise ConfigError(f"eval.encoder: monai.networks.nets has no network '{name}' "
                          "(e.g. resnet10, DenseNet121)")
    if name.startswith("resnet"):  # the ResNet factories drop the classifier with feed_forward=False
        return factory(spatial_dims=3, n_input_channels=1, feed_forward=False)
    try:
        return factory(spatial_dims=3, in_channels=1, out_channels=MONAI_FEATURES)
    except TypeError as exc:
        raise ConfigError(f"eval.encoder: monai:{name} cannot be built as a 3-D, 1-channel feature "
                          f"extractor: {exc}") from None


def feature_dim(encoder: nn.Module, crop_size: int) -> int:
    """`encoder.feature_dim` when it declares one, else the width of its output on a dummy input."""
    declared = getattr(encoder, "feature_dim", None)
    if isinstance(declared, int):
        return declared
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        width = encoder(torch.zeros(1, 1, crop_size, crop_size, crop_size)).shape[-1]
    encoder.train(was_training)
    return int(width)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def needs_location(encoder: nn.Module) -> bool:
    return bool(getattr(encoder, "needs_location", False))


def require_locations(encoder: nn.Module, locations: np.ndarray | None, source: str) -> None:
    """One clear line, before any work, when a location-conditioned encoder meets data without locations."""
    if needs_location(encoder) and locations is None:
        raise DataError(f"the encoder is location-conditioned and {source} carries no locations: add the "
                        "labels.csv columns eval.location_columns (x, y, z in [-1, 1]) or use a packed "
                        "dataset")


@torch.no_grad()
def extract_features(encoder: nn.Module, images: np.ndarray, batch_size: int,
                     locations: np.ndarray | None = None) -> np.ndarray:
    """(N, C, S, S, S) → (N, C·F): each input channel encoded alone (at the sample's location, (N, 3)
    in [−1, 1], when given), features concatenated."""
    encoder.eval()
    device = device_of(encoder)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).to(device)
        where = None if locations is None else torch.from_numpy(locations[start:start + batch_size])
        per_channel = [encoder(batch[:, c:c + 1], location=where).float() for c in range(batch.shape[1])]
        chunks.append(torch.cat(per_channel, dim=1).cpu().numpy())
    return np.concatenate(chunks)

"""The encoder under evaluation, and batched feature extraction.

`eval.encoder` is an exported encoder (`.safetensors` from `sslmed pretrain`/`sslmed export`), `random`
(the `model` section's architecture at random init: the baseline pretraining has to beat), or
`monai:<network>` (a MONAI network used as a feature extractor, e.g. `monai:resnet10`,
`monai:DenseNet121`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslmed.config import Config
from sslmed.errors import CheckpointError, ConfigError

MONAI_FEATURES = 256  # width of the output layer of MONAI networks that have no feature-only mode


def build_encoder(cfg: Config, seed: int = 0) -> nn.Module:
    """A module mapping (B, 1, S, S, S) to (B, F) features, as named by `cfg.eval.encoder`."""
    spec = cfg.eval.encoder
    torch.manual_seed(seed)  # random and MONAI encoders: the same init for the same seed
    if spec == "random":
        from sslmed.models import build_backbone

        return build_backbone(cfg)
    if spec.startswith("monai:"):
        return monai_encoder(spec.removeprefix("monai:"))
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


@torch.no_grad()
def extract_features(encoder: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, C, S, S, S) → (N, C·F): each input channel encoded alone, features concatenated."""
    encoder.eval()
    device = device_of(encoder)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).to(device)
        per_channel = [encoder(batch[:, c:c + 1]).float() for c in range(batch.shape[1])]
        chunks.append(torch.cat(per_channel, dim=1).cpu().numpy())
    return np.concatenate(chunks)

"""sslmed: self-supervised pretraining of 3D encoders on unlabeled CT and MRI volumes."""

__version__ = "0.1.0"


def load_encoder(path):
    """Rebuild an exported encoder: a module mapping (B, 1, D, H, W) float to (B, F) features."""
    from sslmed.train.checkpoint import load_encoder as _load

    return _load(path)


__all__ = ["__version__", "load_encoder"]

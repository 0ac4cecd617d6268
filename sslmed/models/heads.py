"""Small MLP heads: projection/prediction heads of the contrastive methods, classifier heads downstream."""

from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> nn.Sequential:
    """Linear → BatchNorm → ReLU → Linear: the SimCLR/BYOL/SimSiam projection and prediction MLP
    (without the BatchNorm when `batch_norm` is off, as the CAE-residual paper's SimCLR baseline)."""
    norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), *norm, nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


MLP_HEAD_HIDDEN = 256  # the CAE-residual paper's fine-tuning head: features → 256 → classes


def classifier_head(in_dim: int, n_classes: int, kind: str = "linear") -> nn.Sequential:
    """`linear`: LayerNorm → Linear (features of any scale); `mlp`: Linear → ReLU → Linear (256 hidden)."""
    if kind == "mlp":
        hidden = MLP_HEAD_HIDDEN
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, n_classes))
    raise ValueError(f"unknown classifier head '{kind}' (linear, mlp)")

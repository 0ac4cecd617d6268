"""Small MLP heads used by the contrastive and distillation methods."""

from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear → BatchNorm → ReLU → Linear: the SimCLR/BYOL/SimSiam projection and prediction MLP."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))

"""A multi-branch fusion classifier for N co-registered inputs per case (MRI sequences or planes).

Res-MAE transfers its pretrained encoder into "a multi-modal fusion model with a bipartite graph and
multiple branches"; the model itself is unpublished. This is our reading of it, guided by the group's
earlier BgNet (tumour regions of each input as graph vertices, matches across inputs as edges, fusion
at the feature and at the decision level):

* **branches** — input i goes through encoder branch i (one copy per input, or one shared encoder) to
  token/region features T_i (B, L, F): a ViT's patch tokens, the cells of a CNN's last stage map, or,
  for an encoder that offers neither, its pooled feature as a single token;
* **bipartite cross-branch attention** (feature level) — the regions of each input attend to the regions
  of every other input: T_i ← LayerNorm(T_i + MHA(T_i, T_others, T_others)). The attention weights
  between the regions of input i and input j are a soft, learned bipartite matching — where BgNet draws
  hard edges between matched tumour regions, this learns them from the labels;
* **feature-level fusion** — the branch features f_i = mean(T_i) are concatenated and classified;
* **decision-level fusion** — one classifier head per branch on f_i, their logits averaged;
* the output is the mean of the feature-level and the decision-level logits.

With the cross-branch attention switched off the branches never see each other before the heads, so
the decision-level output is exactly the mean of each branch's own head on its own encoder's features.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sslmed.errors import ConfigError
from sslmed.models.heads import classifier_head


def token_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) → (B, L, F) region features whose mean is the encoder's pooled feature."""
    if hasattr(encoder, "forward_tokens"):  # ViT: patch tokens
        return encoder.forward_tokens(x)
    if hasattr(encoder, "forward_features"):  # CNN: cells of the last stage map
        return encoder.forward_features(x)[-1].flatten(2).transpose(1, 2)
    return encoder(x)[:, None]


def attention_heads(width: int, most: int = 8) -> int:
    """The largest head count up to `most` that divides `width`."""
    return next(h for h in range(min(most, width), 0, -1) if width % h == 0)


class CrossBranchAttention(nn.Module):
    """Each branch's tokens attend to the tokens of all other branches (residual, post-norm)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, attention_heads(width), batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(tokens) < 2:
            return tokens
        out = []
        for i, own in enumerate(tokens):
            others = torch.cat([t for j, t in enumerate(tokens) if j != i], dim=1)
            attended, _ = self.attention(own, others, others, need_weights=False)
            out.append(self.norm(own + attended))
        return out


class FusionClassifier(nn.Module):
    """(B, N, D, H, W) — input i in channel i — → (B, n_classes) logits; `fuse(x)` gives every level."""

    def __init__(self, encoder: nn.Module, n_branches: int, width: int, n_classes: int, shared: bool = False,
                 cross_attention: bool = True, head: str = "linear") -> None:
        super().__init__()
        if n_branches < 1:
            raise ConfigError(f"a fusion model needs at least one branch, got {n_branches}")
        self.n_branches, self.shared = n_branches, shared
        copies = 1 if shared else n_branches
        self.encoders = nn.ModuleList(copy.deepcopy(encoder) for _ in range(copies))
        self.cross = CrossBranchAttention(width) if cross_attention else None
        self.branch_heads = nn.ModuleList(classifier_head(width, n_classes, head) for _ in range(n_branches))
        self.fused_head = classifier_head(width * n_branches, n_classes, head)

    def branch_encoder(self, i: int) -> nn.Module:
        return self.encoders[0 if self.shared else i]

    def fuse(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"branch": (B, N, K) per-branch logits, "decision": their mean, "feature": the fused head's
        logits, "logits": the mean of feature- and decision-level logits}."""
        if x.dim() != 5 or x.shape[1] != self.n_branches:
            raise ConfigError(f"fusion model with {self.n_branches} branches got input of shape "
                              f"{tuple(x.shape)}: expected (B, {self.n_branches}, D, H, W)")
        tokens = [token_features(self.branch_encoder(i), x[:, i:i + 1]) for i in range(self.n_branches)]
        if self.cross is not None:
            tokens = self.cross(tokens)
        features = [t.mean(dim=1) for t in tokens]
        branch = torch.stack([head(f) for head, f in zip(self.branch_heads, features, strict=True)], dim=1)
        decision = branch.mean(dim=1)
        feature = self.fused_head(torch.cat(features, dim=1))
        return {"branch": branch, "decision": decision, "feature": feature,
                "logits": (feature + decision) / 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(x)["logits"]

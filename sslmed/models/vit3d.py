"""3-D Vision Transformer: patch embedding, fixed sin-cos positions, pre-norm blocks.

The position embedding is computed for the grid of the crop at hand (and cached per grid), so one
encoder serves any crop size that is a multiple of the patch size. `forward_tokens(x, ids_keep)` drops
masked tokens before the first block: a masked autoencoder's encoder never computes on them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from sslmed.errors import ConfigError

# (dim, depth, heads), as the 2-D ViT-Ti/S/B.
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def sincos_pos_embed(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """(1, prod(grid), dim) fixed 3-D sin-cos embedding; channels beyond a multiple of 6 are zero."""
    usable = 6 * (dim // 6)
    with warnings.catch_warnings():  # MONAI calls meshgrid without `indexing` (its default, "ij", is meant)
        warnings.simplefilter("ignore", UserWarning)
        table = build_sincos_position_embedding(list(grid), usable, spatial_dims=3).detach()
    return F.pad(table, (0, dim - usable))


class Block(nn.Module):
    """Pre-norm transformer block; attention through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks, each optionally recomputed in backward (`checkpointing`)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"ViT width {dim} must be divisible by the number of heads {heads}")
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


class PositionCache(nn.Module):
    """Sin-cos tables per grid, kept out of the state dict (they are a function of the grid)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.tables: dict[tuple, torch.Tensor] = {}

    def forward(self, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        key = (grid, like.device, like.dtype)
        if key not in self.tables:
            self.tables[key] = sincos_pos_embed(grid, self.dim).to(device=like.device, dtype=like.dtype)
        return self.tables[key]


class ViT3D(nn.Module):
    """(B, C, D, H, W) → (B, feature_blocks · dim) features: the tokens of each of the last
    `feature_blocks` blocks, layer-normalised and mean-pooled, concatenated (the multi-block readout of
    DINOv2 / MAE linear probes; 1 gives the last block alone). `forward_tokens` gives the token sequence."""

    def __init__(self, size: str = "tiny", patch_size: int = 16, in_channels: int = 1, dim: int = 0,
                 depth: int = 0, heads: int = 0, mlp_ratio: float = 4.0, feature_blocks: int = 1) -> None:
        super().__init__()
        if size not in VIT_SIZES:
            raise ConfigError(f"unknown ViT size '{size}' (sizes: {', '.join(VIT_SIZES)})")
        base_dim, base_depth, base_heads = VIT_SIZES[size]
        self.dim, self.depth, self.heads = dim or base_dim, depth or base_depth, heads or base_heads
        self.size, self.patch_size, self.in_channels = size, patch_size, in_channels
        self.mlp_ratio = mlp_ratio
        if not 1 <= feature_blocks <= self.depth:
            raise ConfigError(f"model.feature_blocks must be in [1, depth={self.depth}], "
                              f"not {feature_blocks}")
        self.feature_blocks = feature_blocks
        self.patch_embed = nn.Conv3d(in_channels, self.dim, kernel_size=patch_size, stride=patch_size)
        self.pos = PositionCache(self.dim)
        self.transformer = Transformer(self.dim, self.depth, self.heads, mlp_ratio)
        self.apply(_init_weights)

    @property
    def feature_dim(self) -> int:
        return self.dim * self.feature_blocks

    def export_config(self) -> dict:
        return {"arch": "vit3d", "kwargs": {
            "size": self.size, "patch_size": self.patch_size, "in_channels": self.in_channels,
            "dim": self.dim, "depth": self.depth, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
            "feature_blocks": self.feature_blocks}}

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        spatial = tuple(x.shape[2:])
        if len(spatial) != 3 or any(s % self.patch_size for s in spatial):
            raise ConfigError(f"input of shape {tuple(x.shape)}: spatial sides must be multiples of the "
                              f"patch size {self.patch_size}")
        return tuple(s // self.patch_size for s in spatial)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions added: (B, T, dim), T in D-H-W raster order."""
        grid = self.grid(x)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.pos(grid, tokens)

    def forward_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded tokens; with `ids_keep` (B, T_keep) only those tokens enter the blocks."""
        tokens = self.embed(x)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.transformer(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_blocks == 1:
            return self.forward_tokens(x).mean(dim=1)
        tokens = self.embed(x)
        pooled = []
        first_read = self.depth - self.feature_blocks
        for index, block in enumerate(self.transformer.blocks):
            tokens = block(tokens)
            if index >= first_read:  # the final norm on every block read, as the last block gets it
                pooled.append(self.transformer.norm(tokens).mean(dim=1))
        return torch.cat(pooled, dim=1)


class ViTDecoder(nn.Module):
    """Light MAE decoder: visible tokens + mask tokens → per-patch voxel predictions.

    `forward` returns (pred (B, T, patch³·C), latent (B, T, decoder_dim)); the latent (the blocks'
    output, before the prediction layer) is what self-distillation compares with the encoder.
    """

    def __init__(self, encoder_dim: int, patch_size: int, in_channels: int = 1, dim: int = 128,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = PositionCache(dim)
        self.transformer = Transformer(dim, depth, heads)
        self.pred = nn.Linear(dim, patch_size**3 * in_channels)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor,
                grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(visible)
        b, n_vis, d = x.shape
        masks = self.mask_token.expand(b, ids_restore.shape[1] - n_vis, d)
        x = torch.cat([x, masks], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # back to raster order
        latent = self.transformer(x + self.pos(grid, x))
        return self.pred(latent), latent


# ViT3D parameter name → monai.networks.nets.ViT parameter name, per block and outside the blocks.
_MONAI_BLOCK_NAMES = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.out_proj", "norm2": "norm2",
                      "mlp.0": "mlp.linear1", "mlp.2": "mlp.linear2"}
_MONAI_NAMES = {"patch_embed": "patch_embedding.patch_embeddings", "transformer.norm": "norm"}


def to_monai_vit(encoder: ViT3D, crop_size: int | tuple[int, int, int]) -> nn.Module:
    """The same weights in `monai.networks.nets.ViT` (conv patches, sin-cos positions, QKV bias) for
    inputs of `crop_size`: MONAI's ViT returns the token sequence, whose mean over tokens equals
    `encoder(x)`. MONAI fixes the grid at construction, hence the crop size."""
    from monai.networks.nets import ViT

    size = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(crop_size)
    if encoder.dim % 6:
        raise ConfigError(f"MONAI's 3-D sin-cos positions need a width divisible by 6, not {encoder.dim}")
    grid = encoder.grid(torch.zeros(1, 1, *size))
    with warnings.catch_warnings():  # MONAI's meshgrid call without `indexing`, as above
        warnings.simplefilter("ignore", UserWarning)
        monai_vit = ViT(in_channels=encoder.in_channels, img_size=size, patch_size=encoder.patch_size,
                        hidden_size=encoder.dim, mlp_dim=int(encoder.dim * encoder.mlp_ratio),
                        num_layers=encoder.depth, num_heads=encoder.heads, proj_type="conv",
                        pos_embed_type="sincos", qkv_bias=True, classification=False)
    state = monai_vit.state_dict()  # keeps MONAI's own unused cross-attention norms
    for name, value in encoder.state_dict().items():
        state[_monai_name(name)] = value
    state["patch_embedding.position_embeddings"] = sincos_pos_embed(grid, encoder.dim)
    monai_vit.load_state_dict(state, strict=True)
    return monai_vit


def _monai_name(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    if module.startswith("transformer.blocks."):
        index, _, inner = module.removeprefix("transformer.blocks.").partition(".")
        return f"blocks.{index}.{_MONAI_BLOCK_NAMES[inner]}.{leaf}"
    return f"{_MONAI_NAMES[module]}.{leaf}"


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""Pure helpers that put expert features on the base grid and pool routing tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_side(num_tokens: int, what: str = "features") -> int:
    """Side of the square grid holding ``num_tokens`` tokens; error if not a perfect square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{what} have {num_tokens} tokens, which is not a square grid")
    return side


def align_to_grid(features: Tensor, grid: int, dtype: torch.dtype | None = None) -> Tensor:
    """Resize (B, L, C) features on a square row-major grid to (B, grid*grid, C).

    Cast to ``dtype`` (the base encoder's), interpolate bilinearly in fp32 with
    ``align_corners=False`` and no antialiasing (also when shrinking), cast back. A map already
    on the target grid is returned untouched (only cast).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, L, C), got shape {tuple(features.shape)}")
    dtype = dtype or features.dtype
    features = features.to(dtype)
    batch, length, channels = features.shape
    side = grid_side(length)
    if side == grid:
        return features
    x = features.float().transpose(1, 2).reshape(batch, channels, side, side)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)
    return x.reshape(batch, channels, grid * grid).transpose(1, 2).to(dtype).contiguous()


def pool_routing_tokens(tokens: Tensor, pool: int = 2) -> Tensor:
    """Average-pool (B, S*S, D) image tokens by ``pool`` per side: 24x24 -> 12x12 in MoVA."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, L, D), got shape {tuple(tokens.shape)}")
    batch, length, width = tokens.shape
    side = grid_side(length, "image tokens")
    if side % pool:
        raise ValueError(f"image token grid {side}x{side} is not divisible by pool={pool}")
    x = tokens.transpose(1, 2).reshape(batch, width, side, side)
    x = F.avg_pool2d(x, kernel_size=pool, stride=pool)
    return x.flatten(2).transpose(1, 2).contiguous()

"""2D rotary position encoding on a square token grid (interleaved-pair layout).

Per head of ``d`` dims: dims ``0..d/2-1`` encode the row, ``d/2..d-1`` the column. Each half uses
``d/4`` frequencies ``theta**(-4i/d)``, each shared by one adjacent pair of dims, and rotates the
pairs ``(2m, 2m+1)``: ``(a, b) -> (a cos - b sin, b cos + a sin)`` (METHOD.md, stage 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def rotary_2d_angles(head_dim: int, grid_size: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles ``(grid_size**2, head_dim)`` in fp32 for tokens ``r * grid_size + c``."""
    if head_dim <= 0 or head_dim % 4:
        raise ValueError(f"head_dim must be a positive multiple of 4, got {head_dim}")
    if grid_size <= 0:
        raise ValueError(f"grid_size must be > 0, got {grid_size}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) * 4.0 / head_dim)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows = pos.repeat_interleave(grid_size)  # token index r * G + c -> r
    cols = pos.repeat(grid_size)  # token index r * G + c -> c
    row_angles = (rows[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)
    col_angles = (cols[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)
    return torch.cat([row_angles, col_angles], dim=-1).float()


def _rotate_pairs(x: Tensor) -> Tensor:
    """Map each pair ``(a, b)`` to ``(-b, a)``."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rotary_2d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (..., L, d)`` by per-token angles given as ``cos``/``sin`` ``(L, d)``.

    Computed in fp32 and cast back to ``x.dtype``.
    """
    if x.shape[-2:] != cos.shape or cos.shape != sin.shape:
        raise ValueError(
            f"x must end in (L, head_dim) = {tuple(cos.shape)} matching cos/sin, "
            f"got x {tuple(x.shape)}, sin {tuple(sin.shape)}"
        )
    xf = x.float()
    out = xf * cos.float() + _rotate_pairs(xf) * sin.float()
    return out.to(x.dtype)


class Rotary2D(nn.Module):
    """2D rotary encoding for ``(B, heads, G*G, head_dim)`` queries or keys.

    The cos/sin tables are non-persistent fp32 buffers; they stay fp32 (and are rebuilt) when
    the module is cast or moved, so bf16 models keep exact angles.
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.grid_size = grid_size
        self.theta = theta
        angles = rotary_2d_angles(head_dim, grid_size, theta)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Rotary2D:
        # Casting (e.g. .to(bfloat16)) or to_empty() would spoil the tables: rebuild in fp32.
        super()._apply(fn, recurse)
        angles = rotary_2d_angles(self.head_dim, self.grid_size, self.theta).to(self.cos.device)
        self.cos = angles.cos()
        self.sin = angles.sin()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x (B, heads, G*G, head_dim)``; same shape and dtype."""
        expected = (self.grid_size * self.grid_size, self.head_dim)
        if x.dim() != 4 or tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"rotary input must be (B, heads, {expected[0]}, {expected[1]}), "
                f"got {tuple(x.shape)}"
            )
        return apply_rotary_2d(x, self.cos, self.sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, grid_size={self.grid_size}, theta={self.theta}"

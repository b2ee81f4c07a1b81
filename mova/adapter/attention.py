"""Grid attention of the MoV-Adapter, shared by the expert cross-attention and self-attention.

q = x Wq, k = F Wk, v = F Wv (no bias), 2D rotary on q and k, softmax attention (no mask, no
dropout), merge heads, LayerNorm over the merged heads, output projection (bias, zero init, so
the module outputs exactly zero at initialisation).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mova.adapter.rotary import Rotary2D


class GridAttention(nn.Module):
    """Multi-head attention of grid queries ``x (B, G*G, dim)`` over grid keys ``(B, G*G, kv_dim)``.

    ``rotary`` is shared between all attention layers of an adapter (it holds no parameters).
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int, rotary: Rotary2D,
                 eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if dim // num_heads != rotary.head_dim:
            raise ValueError(
                f"rotary.head_dim={rotary.head_dim} must equal dim // num_heads = "
                f"{dim // num_heads}"
            )
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, dim, bias=False)
        self.rotary = rotary
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        """Attend from ``x (B, G*G, dim)`` to ``kv (B, G*G, kv_dim)``; returns ``(B, G*G, dim)``."""
        q = self.rotary(self._split(self.q_proj(x)))
        k = self.rotary(self._split(self.k_proj(kv)))
        v = self._split(self.v_proj(kv))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(self.norm(out.transpose(1, 2).flatten(2)))

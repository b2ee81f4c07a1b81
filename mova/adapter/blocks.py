"""One MoV-Adapter block: context-aware gate, expert knowledge extractor, self-attention, SwiGLU.

Every zero-initialised last layer makes a freshly built block the exact identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mova.adapter.attention import GridAttention
from mova.adapter.rotary import Rotary2D

MASK_PENALTY = -1e6
"""Added (in fp32) to the gate logits of experts a sample does not route."""


def route_top_k(logits: Tensor, mask: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Gate weights ``(B, N)`` in fp32 and the top-k picks ``(B, k)`` (pool indices, -1 where a
    pick carries no weight: an unrouted filler, or a sample that routes nothing).

    Unrouted experts get -1e6, then softmax, keep the top-k and renormalise to sum 1; a sample
    that routes nothing gets all-zero weights (its expert branch is multiplied by 0).
    """
    if logits.shape != mask.shape:
        raise ValueError(f"mask must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(mask.shape)}")
    mask = mask.bool()
    probs = (logits.float() + MASK_PENALTY * (~mask).float()).softmax(dim=-1)
    top, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, index, top)
    weights = weights * mask.any(dim=-1, keepdim=True)
    return weights, index.masked_fill(weights.gather(-1, index) == 0, -1)


def route_weights(logits: Tensor, mask: Tensor, top_k: int) -> Tensor:
    """Gate weights ``(B, N)`` in fp32 from logits ``(B, N)`` and a bool routing mask ``(B, N)``
    (see :func:`route_top_k`, which also returns the picks)."""
    return route_top_k(logits, mask, top_k)[0]


class ExpertGate(nn.Module):
    """Per-block gate: MLP([text ; mean over tokens of x]) -> N logits -> routed top-k weights."""

    def __init__(self, text_dim: int, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.fc1 = nn.Linear(text_dim + dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, num_experts)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def logits(self, text: Tensor, x: Tensor) -> Tensor:
        """Raw router logits ``(B, N)`` for text ``(B, T)`` and tokens ``(B, L, dim)``."""
        return self.fc2(self.act(self.fc1(torch.cat([text, x.mean(dim=1)], dim=-1))))

    def forward(self, text: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        """fp32 weights ``(B, N)`` for text ``(B, T)``, tokens ``(B, L, dim)``, mask ``(B, N)``."""
        return route_weights(self.logits(text, x), mask, self.top_k)


class SwiGLU(nn.Module):
    """``W3(LN(silu(W1 x) * W2 x))`` with biases everywhere and W3 zero-initialised."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.w3.weight)
        nn.init.zeros_(self.w3.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.norm(F.silu(self.w1(x)) * self.w2(x)))


class ExpertExtractor(nn.Module):
    """``CrossAttn_j(LN1_j(x), LN2_j(F_j))`` for one expert of width ``expert_dim``."""

    def __init__(self, dim: int, expert_dim: int, num_heads: int, rotary: Rotary2D,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim, eps=eps)
        self.norm_f = nn.LayerNorm(expert_dim, eps=eps)
        self.attn = GridAttention(dim, expert_dim, num_heads, rotary, eps)

    def forward(self, x: Tensor, features: Tensor) -> Tensor:
        return self.attn(self.norm_x(x), self.norm_f(features))


class MoVBlock(nn.Module):
    """Gate, expert knowledge extractor, self-attention and SwiGLU, each with a residual."""

    def __init__(self, dim: int, text_dim: int, expert_channels: Mapping[str, int],
                 num_heads: int, top_k: int, mlp_hidden: int, rotary: Rotary2D,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.expert_names = list(expert_channels)
        self.gate = ExpertGate(text_dim, dim, len(self.expert_names), top_k)
        self.extractors = nn.ModuleDict({
            name: ExpertExtractor(dim, width, num_heads, rotary, eps)
            for name, width in expert_channels.items()
        })
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = GridAttention(dim, dim, num_heads, rotary, eps)
        self.norm4 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, eps)

    def extract(self, x: Tensor, features: Mapping[str, Tensor], weights: Tensor,
                active: Sequence[str]) -> Tensor:
        """``sum_j p_j * out_j`` over the ``active`` experts (zero when none is active)."""
        branch = torch.zeros_like(x)
        for name in active:
            out = self.extractors[name](x, features[name])
            p = weights[:, self.expert_names.index(name)].to(out.dtype)
            branch = branch + p[:, None, None] * out
        return branch

    def forward(self, x: Tensor, text: Tensor, features: Mapping[str, Tensor], mask: Tensor,
                active: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Returns the new tokens ``(B, L, dim)`` and this block's fp32 gate weights ``(B, N)``.

        ``active`` names the experts routed by at least one sample; only those are computed.
        """
        weights = self.gate(text, x, mask)
        x = x + self.extract(x, features, weights, active)
        h = self.norm3(x)
        x = x + self.self_attn(h, h)
        x = x + self.mlp(self.norm4(x))
        return x, weights

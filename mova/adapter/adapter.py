"""The MoV-Adapter: fine-grained fusion of the routed experts into the base features.

x = B0 + pos; L blocks (gate, expert extractor, self-attention, SwiGLU); (x + B0) / 2;
downsampler on the G x G map; MLP into the LLM width D (METHOD.md, stage 2). With an all-zero
expert mask (the routing pass) the expert branch is exactly zero and no expert features are read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mova.adapter.blocks import MoVBlock, route_top_k
from mova.adapter.downsampler import Downsampler
from mova.adapter.rotary import Rotary2D
from mova.config import AdapterConfig

logger = logging.getLogger(__name__)


@dataclass
class AdapterOutput:
    """Image tokens for the LLM and the gate weights each block used."""

    image_tokens: Tensor
    """``(B, (G / downsample)**2, D)``."""
    gate_weights: Tensor | None = None
    """``(B, num_blocks, N)`` fp32 renormalised top-k weights; zeros for a sample routing none."""
    router_logits: Tensor | None = None
    """With ``debug``: ``(B, num_blocks, N)`` fp32 raw gate logits, before the routing mask."""
    top_k: Tensor | None = None
    """With ``debug``: ``(B, num_blocks, k)`` int64 pool indices of each block's top-k picks,
    best first; -1 where a pick has zero weight (unrouted filler, or a sample routing none)."""


class PositionEmbedding(nn.Module):
    """Learned, zero-initialised position embedding added to the base tokens.

    A leaf module of its own (not a bare parameter of the adapter) so that sharded data
    parallelism (ZeRO-3) gathers it around its own forward and backward like any layer.
    """

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, tokens, width))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight


class MoVAdapter(nn.Module):
    """Projects base features ``(B, G*G, C)`` plus routed expert features into LLM tokens."""

    def __init__(self, config: AdapterConfig, *, hidden_size: int, grid_size: int,
                 expert_channels: Mapping[str, int], text_hidden_size: int,
                 llm_hidden_size: int) -> None:
        super().__init__()
        if not expert_channels:
            raise ValueError("expert_channels must name at least one expert")
        bad = [n for n in expert_channels if not n or "." in n]
        if bad:
            raise ValueError(f"expert_channels names {bad} must be non-empty without '.'")
        if hidden_size % config.num_heads or (hidden_size // config.num_heads) % 4:
            raise ValueError(
                f"hidden_size={hidden_size} must split into config.num_heads="
                f"{config.num_heads} heads whose size is a multiple of 4"
            )
        if grid_size % config.downsample:
            raise ValueError(f"grid_size={grid_size} must be divisible by "
                             f"config.downsample={config.downsample}")
        self.config = config
        self.hidden_size = hidden_size
        self.grid_size = grid_size
        self.text_hidden_size = text_hidden_size
        self.expert_names: list[str] = list(expert_channels)
        self.expert_channels = dict(expert_channels)
        self.gradient_checkpointing: bool = False
        eps = config.layer_norm_eps
        self.rotary = Rotary2D(hidden_size // config.num_heads, grid_size, config.rope_theta)
        self.pos_embed = PositionEmbedding(grid_size * grid_size, hidden_size)
        self.blocks = nn.ModuleList(
            MoVBlock(hidden_size, text_hidden_size, self.expert_channels, config.num_heads,
                     config.top_k, int(config.mlp_ratio * hidden_size), self.rotary, eps)
            for _ in range(config.num_blocks)
        )
        self.downsampler = Downsampler(hidden_size, config.downsample, eps)
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )

    @property
    def num_image_tokens(self) -> int:
        return (self.grid_size // self.config.downsample) ** 2

    def forward(self, base_features: Tensor, text_features: Tensor,
                expert_features: Mapping[str, Tensor] | None, expert_mask: Tensor,
                *, return_gates: bool = True, compute_experts: Sequence[str] = (),
                debug: bool = False) -> AdapterOutput:
        """Fuse the experts routed in ``expert_mask (B, N)`` (columns in ``expert_names`` order).

        ``expert_features`` maps names to ``(B, G*G, C_j)`` maps already aligned to the base grid;
        only experts routed for at least one sample are read. ``compute_experts`` names experts
        whose branch runs even if no sample here routes them (their weight is exactly 0): data-
        parallel training passes the union over ranks so every rank builds the same graph.
        ``debug`` also returns each block's raw router logits and top-k picks (off by default;
        the logits are recomputed from the block input, so the default path is unchanged).
        """
        dtype = self.pos_embed.weight.dtype
        mask = self._check_mask(expert_mask, base_features)
        routed = mask.any(dim=0).tolist()
        unknown = sorted(set(compute_experts) - set(self.expert_names))
        if unknown:
            raise ValueError(f"compute_experts has unknown expert(s) {unknown}")
        active = [n for n, used in zip(self.expert_names, routed, strict=True)
                  if used or n in compute_experts]
        features = self._check_features(expert_features or {}, active, mask.shape[0])
        text = self._check_text(text_features, mask.shape[0]).to(dtype)
        base = base_features.to(dtype)
        x = self.pos_embed(base)
        gates, logits, picks = [], [], []
        for block in self.blocks:
            if debug:
                with torch.no_grad():
                    raw = block.gate.logits(text, x).float()
                logits.append(raw)
                picks.append(route_top_k(raw, mask, block.gate.top_k)[1])
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, weights = checkpoint(block, x, text, features, mask, active,
                                        use_reentrant=False)
            else:
                x, weights = block(x, text, features, mask, active)
            gates.append(weights)
        x = (x + base) / 2
        grid = x.transpose(1, 2).unflatten(-1, (self.grid_size, self.grid_size))
        tokens = self.downsampler(grid).flatten(2).transpose(1, 2)
        gate_weights = torch.stack(gates, dim=1) if return_gates else None
        out = AdapterOutput(image_tokens=self.projector(tokens), gate_weights=gate_weights)
        if debug:
            out.router_logits = torch.stack(logits, dim=1)
            out.top_k = torch.stack(picks, dim=1)
        return out

    # ---- input checks ------------------------------------------------------------------------
    def _check_mask(self, expert_mask: Tensor, base_features: Tensor) -> Tensor:
        """Validate the base features and mask shapes; returns the mask as bool on their device."""
        tokens = self.grid_size * self.grid_size
        if base_features.dim() != 3 or tuple(base_features.shape[1:]) != (tokens,
                                                                          self.hidden_size):
            raise ValueError(f"base_features must be (B, {tokens}, {self.hidden_size}), "
                             f"got {tuple(base_features.shape)}")
        expected = (base_features.shape[0], len(self.expert_names))
        if tuple(expert_mask.shape) != expected:
            raise ValueError(f"expert_mask must be (B, N) = {expected} with columns "
                             f"{self.expert_names}, got {tuple(expert_mask.shape)}")
        if expert_mask.dtype != torch.bool:
            if not ((expert_mask == 0) | (expert_mask == 1)).all():
                raise ValueError("expert_mask must be bool or hold only 0 and 1")
            expert_mask = expert_mask != 0
        return expert_mask.to(base_features.device)

    def _check_text(self, text_features: Tensor, batch: int) -> Tensor:
        expected = (batch, self.text_hidden_size)
        if tuple(text_features.shape) != expected:
            raise ValueError(f"text_features must be (B, T) = {expected}, "
                             f"got {tuple(text_features.shape)}")
        return text_features

    def _check_features(self, expert_features: Mapping[str, Tensor], active: list[str],
                        batch: int) -> dict[str, Tensor]:
        """The features of the ``active`` experts, shape-checked and cast to the model dtype."""
        unknown = sorted(set(expert_features) - set(self.expert_names))
        if unknown:
            raise ValueError(f"expert_features has unknown expert(s) {unknown}; "
                             f"expected names from {self.expert_names}")
        missing = [n for n in active if n not in expert_features]
        if missing:
            raise ValueError(f"expert_features lacks {missing}: routed by expert_mask for at "
                             f"least one sample, so their aligned features are required")
        tokens = self.grid_size * self.grid_size
        out = {}
        for name in active:
            feat = expert_features[name]
            expected = (batch, tokens, self.expert_channels[name])
            if tuple(feat.shape) != expected:
                raise ValueError(f"expert_features[{name!r}] must be {expected} (aligned to the "
                                 f"base grid), got {tuple(feat.shape)}")
            out[name] = feat.to(self.pos_embed.weight.dtype)
        return out

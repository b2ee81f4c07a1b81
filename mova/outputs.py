"""Typed outputs of the model's steps (no model code here, so every module can import them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class MoVAOutput:
    """The training/teacher-forced forward: loss (when labels are given), logits, gates."""

    loss: Tensor | None
    logits: Tensor
    gate_weights: Tensor | None = None


@dataclass
class RoutingResult:
    """The routing decision for a batch: a 0/1 mask over the pool and the raw replies."""

    mask: Tensor
    replies: list[str | None]  # None where the routing was forced, not decoded
    experts: list[list[str]]


@dataclass
class GenerationResult:
    """One sample's two-stage answer: the text, its routing and the adapter's gate weights."""

    answer: str
    experts: list[str]
    routing_reply: str | None
    gate_weights: list[list[float]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0

"""MoV-Adapter (METHOD.md, stage 2): the context-aware projector from vision to LLM tokens."""

from __future__ import annotations

from mova.adapter.adapter import AdapterOutput, MoVAdapter
from mova.adapter.attention import GridAttention
from mova.adapter.blocks import (
    ExpertExtractor,
    ExpertGate,
    MoVBlock,
    SwiGLU,
    route_top_k,
    route_weights,
)
from mova.adapter.downsampler import BottleneckStage, Downsampler, LayerNorm2d, SqueezeExcite
from mova.adapter.rotary import Rotary2D, apply_rotary_2d, rotary_2d_angles

__all__ = [
    "AdapterOutput",
    "BottleneckStage",
    "Downsampler",
    "ExpertExtractor",
    "ExpertGate",
    "GridAttention",
    "LayerNorm2d",
    "MoVAdapter",
    "MoVBlock",
    "Rotary2D",
    "SqueezeExcite",
    "SwiGLU",
    "apply_rotary_2d",
    "rotary_2d_angles",
    "route_top_k",
    "route_weights",
]

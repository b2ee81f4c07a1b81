"""Vision experts: the registry, encoders built from transformers classes, preprocessing."""

from mova.experts.registry import (
    DEFAULT_POOL,
    ExpertSpec,
    ImageInput,
    ResolvedExpert,
    expert_names,
    get_expert_spec,
    register,
    resolve_expert,
)

__all__ = [
    "DEFAULT_POOL",
    "ExpertSpec",
    "ImageInput",
    "ResolvedExpert",
    "expert_names",
    "get_expert_spec",
    "register",
    "resolve_expert",
]

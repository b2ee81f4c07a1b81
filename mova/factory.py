"""Build a whole MoVA model: from a config (random-init tiny parts or real checkpoints by path
or hub id), or from a saved checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from pathlib import Path

import torch

from mova.builders import build_parts
from mova.config import ExpertConfig, MoVAConfig
from mova.device import torch_dtype
from mova.modeling import MoVAModel

log = logging.getLogger(__name__)


def build_model(config: MoVAConfig, *, seed: int | None = None) -> MoVAModel:
    """Build a complete MoVA model from ``config`` (random init where nothing is pretrained),
    in eval mode like ``from_pretrained``; training loops call ``model.train()``."""
    config.validate()
    start = time.perf_counter()
    if seed is not None:
        torch.manual_seed(seed)
    model = MoVAModel(config, **build_parts(config))
    model.to(torch_dtype(config.dtype))
    model.apply_trainability()
    model.eval()
    log.info("built MoVA (%d experts, %.1fM params) in %.1f s", len(config.experts),
             sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - start)
    return model


def from_pretrained(path: str | Path, *, device: str | torch.device = "cpu",
                    skip: Collection[str] = ()) -> MoVAModel:
    """Load a saved MoVA checkpoint (see :mod:`mova.checkpoint` for the layout); parts in
    ``skip`` are never read (see :func:`mova.checkpoint.load_parts`)."""
    return MoVAModel.from_pretrained(path, device=device, skip=skip)


def tiny_config(**overrides) -> MoVAConfig:
    """The embedded default: every component at its tiny preset (the whole default pool)."""
    return MoVAConfig(**overrides).validate()


def build_tiny_mova(seed: int = 0, experts: list[str] | None = None) -> MoVAModel:
    """A complete tiny MoVA (the whole default pool unless ``experts`` names a subset), built
    in seconds on CPU, no downloads."""
    config = tiny_config()
    if experts is not None:
        config.experts = [ExpertConfig(name=n) for n in experts]
        config.routing.max_experts = min(config.routing.max_experts, len(experts))
    return build_model(config, seed=seed)

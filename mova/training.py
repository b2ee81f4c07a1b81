"""Training rules of the model library: what each stage trains, LoRA, the LR schedule.

Stages (METHOD.md): ``pretrain`` trains the MoV-Adapter, the text encoder and the base encoder
with the LLM frozen; ``sft`` trains everything but the experts (optionally LoRA on the LLM).
Experts are never trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from mova.modeling import MoVAModel

log = logging.getLogger(__name__)


def set_stage(model: MoVAModel, stage: str) -> None:
    """Freeze and unfreeze the parts of ``model`` for a training stage."""
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"stage={stage!r}; expected 'pretrain' or 'sft'")
    model.requires_grad_(False)
    model.adapter.requires_grad_(True)
    model.text_encoder.requires_grad_(model.config.text_encoder.trainable)
    model.base_encoder.requires_grad_(model.config.base.trainable)
    freeze_unused_base_layers(model)
    model.llm.requires_grad_(stage == "sft")
    model.experts.requires_grad_(False)


def freeze_unused_base_layers(model: MoVAModel) -> None:
    """Layers after the base encoder's feature layer (and its post-norm) never reach the
    output: freeze them so no optimizer state or gradient reduction is spent on them."""
    vision = model.base_encoder.model
    layers = vision.encoder.layers if hasattr(vision, "encoder") else \
        vision.vision_model.encoder.layers
    used = model.base_encoder.feature_layer % (len(layers) + 1)
    for layer in layers[used:]:
        layer.requires_grad_(False)
    post = getattr(vision, "post_layernorm", None) or getattr(
        getattr(vision, "vision_model", None), "post_layernorm", None)
    if post is not None:
        post.requires_grad_(False)


def add_lora(model: MoVAModel, r: int, alpha: int, dropout: float,
             target_modules: Sequence[str]) -> None:
    """Wrap the LLM with peft LoRA adapters; only they train in the LLM."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, config)


def merge_lora(model: MoVAModel) -> None:
    """Fold LoRA weights into the LLM (for export); no-op without LoRA."""
    if isinstance(model.llm, PeftModel):
        model.llm = model.llm.merge_and_unload()


def enable_gradient_checkpointing(model: MoVAModel) -> None:
    for part in (model.llm, model.text_encoder, model.base_encoder.model):
        if hasattr(part, "gradient_checkpointing_enable"):
            part.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.adapter.gradient_checkpointing = True


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def routing_stats(mask: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Per-batch routing statistics: mean experts per sample and each expert's rate."""
    mask = mask.float()
    stats = {"routing/experts_per_sample": float(mask.sum(1).mean())}
    rates = mask.mean(0)
    stats.update({f"routing/{n}": float(rates[j]) for j, n in enumerate(names)})
    return stats


class TrainableParts(nn.Module):
    """The module a distributed engine (DeepSpeed) manages: every part of a MoVA model but its
    frozen experts.

    Experts only run inference, on the samples routed to them; under ZeRO-3 their parameters
    would be partitioned and gathered collectively, and ranks whose batches route different
    experts would then disagree on the collectives. The forward is the model's forward; the
    parts are the same module objects, so hooks and weights are shared.
    """

    def __init__(self, model: MoVAModel) -> None:
        super().__init__()
        self.llm = model.llm
        self.text_encoder = model.text_encoder
        self.base_encoder = model.base_encoder
        self.adapter = model.adapter
        self.__dict__["mova"] = model  # not registered: the experts stay outside

    def forward(self, **kwargs):
        return self.mova(**kwargs)

    def train(self, mode: bool = True) -> TrainableParts:
        super().train(mode)
        self.mova.train(mode)
        return self

"""Loss-driven routing labels (METHOD.md, "Routing labels").

For sample i, expert j is in the routing label R_i iff the LM loss of the model using expert j
alone is lower than the loss of the base-only model; at most ``max_experts`` are kept (the
lowest losses). A MoVA model with single-expert masks plays the role of the paper's
single-encoder models: :func:`single_expert_losses` runs the base and text encoders once, then
the MoV-Adapter and the LLM once per condition (no expert, each expert alone) and returns each
sample's mean next-token loss under each condition. :func:`select_experts` and
:func:`label_rows` apply the rule; :func:`activation_rates` summarises labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mova.conversation import IGNORE_INDEX
from mova.modeling import MoVAModel

BASE = "base"
"""Name of the no-expert condition (column 0 of :func:`single_expert_losses`)."""


def per_sample_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each sample, ``(B,)`` in fp32.

    Same shift and ignore index as a Hugging Face causal LM's ``loss`` (which averages over the
    whole batch instead); a sample without supervised tokens gets NaN.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    targets = labels[:, 1:].to(logits.device)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                         ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    total = (ce * valid).sum(dim=1)
    count = valid.sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


@torch.no_grad()
def single_expert_losses(
    model: MoVAModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    pixel_values: Tensor,
    gate_input_ids: Tensor,
    gate_attention_mask: Tensor,
    *,
    expert_features: Mapping[str, Tensor] | None = None,
    expert_inputs: Mapping[str, Tensor] | None = None,
    experts: Sequence[str] | None = None,
) -> Tensor:
    """Per-sample LM loss with no expert and with each single expert: ``(B, 1 + E)`` fp32.

    Column 0 is the base alone (all-zero expert mask); column ``1 + k`` uses ``experts[k]``
    alone (default: the whole pool, in pool order). Each expert's native-grid features come
    from ``expert_features`` (e.g. the feature cache) or are computed from ``expert_inputs``.
    The inputs are those of :meth:`MoVAModel.forward` for answer samples (full image tokens).
    """
    pool = model.expert_names
    names = list(pool if experts is None else experts)
    unknown = [n for n in names if n not in pool]
    if unknown:
        raise ValueError(f"unknown expert(s) {unknown}; pool: {pool}")
    if len(set(names)) != len(names):
        raise ValueError(f"experts {names} name an expert twice")
    native: dict[str, Tensor] = {}
    for name in names:
        if expert_features is not None and name in expert_features:
            native[name] = expert_features[name]
        elif expert_inputs is not None and name in expert_inputs:
            native[name] = model.expert_features(name, expert_inputs[name])
        else:
            raise ValueError(f"expert {name!r}: neither its features nor its inputs were given")
    aligned = model.align(native)
    base = model.encode_base(pixel_values)
    text = model.encode_text(gate_input_ids, gate_attention_mask)
    batch = base.shape[0]
    attention_mask = attention_mask.to(model.device)
    losses = []
    for name in [None, *names]:
        mask = torch.zeros(batch, len(pool), dtype=torch.bool, device=model.device)
        features = None
        if name is not None:
            mask[:, pool.index(name)] = True
            features = {name: aligned[name]}
        fused = model.adapter(base, text, features, mask, return_gates=False)
        embeds = model.embed(input_ids, fused.image_tokens)
        logits = model.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits
        losses.append(per_sample_loss(logits, labels))
    return torch.stack(losses, dim=1)


def select_experts(base_loss: float, expert_losses: Mapping[str, float], *,
                   max_experts: int = 3, margin: float = 0.0) -> list[str]:
    """The routing label of one sample: experts whose loss is below ``base_loss - margin``,
    at most ``max_experts`` of them, lowest loss first (ties keep the mapping's order).

    A non-finite base loss (a sample without supervised tokens) or expert loss never selects.
    """
    if max_experts < 0:
        raise ValueError(f"max_experts must be >= 0, got {max_experts}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not math.isfinite(base_loss):
        return []
    better = [(loss, i, name) for i, (name, loss) in enumerate(expert_losses.items())
              if math.isfinite(loss) and loss < base_loss - margin]
    better.sort()
    return [name for _, _, name in better[:max_experts]]


def label_rows(losses: Tensor | Sequence[Sequence[float]], experts: Sequence[str], *,
               max_experts: int = 3, margin: float = 0.0) -> list[list[str]]:
    """:func:`select_experts` for each row of a ``(B, 1 + E)`` loss table (base first)."""
    table = torch.as_tensor(losses, dtype=torch.float64)
    if table.dim() != 2 or table.shape[1] != len(experts) + 1:
        raise ValueError(f"losses must be (B, 1 + {len(experts)}), got {tuple(table.shape)}")
    return [select_experts(float(row[0]), dict(zip(experts, row[1:].tolist(), strict=True)),
                           max_experts=max_experts, margin=margin) for row in table]


def activation_rates(labels: Sequence[Sequence[str]], experts: Sequence[str]) -> dict[str, float]:
    """Fraction of the labels that hold each expert (0.0 for every expert when none)."""
    counts = dict.fromkeys(experts, 0)
    for label in labels:
        for name in set(label):
            if name in counts:
                counts[name] += 1
    n = len(labels)
    return {name: counts[name] / n if n else 0.0 for name in experts}

"""State-dict keys of the released MoVA checkpoint: which part each key belongs to, and the
released MoV-Adapter names mapped to ours (REFERENCE.md's table; no transposes anywhere).

String work plus the check of the released 2D-RoPE tables: this module reads no files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mova.adapter.rotary import rotary_2d_angles
from mova.convert import ReferenceImportError

LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
ADAPTER_PREFIX = "model.mm_projector."
TEXT_PREFIX = ADAPTER_PREFIX + "text_encoder.bert."
TOWER_PREFIX = "model.vision_tower.vision_tower_"
ROPE_TOLERANCE = 1e-4
RELEASED_HEADS = 16
"""The released adapter's attention hard-codes 16 heads (64 dims each at C = 1024)."""

# Buffers the loading code recomputes; an older transformers may have saved them.
RECOMPUTED = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
              re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$"))

_ROPE = re.compile(r"blocks\.(\d+)\.(cross_attn\.(\d+)|self_attn)\.rope\.freqs_(cos|sin)")
_STAGE = {"conv1.conv.weight": "conv1.weight", "conv2.conv.weight": "conv2.weight",
          "conv3.conv.weight": "conv3.weight"}
_STAGE_NORMS = {"conv1.bn": "norm1", "conv2.bn": "norm2", "conv3.bn": "norm3",
                "se.fc1": "se.reduce", "se.fc2": "se.expand"}
_ATTN = {"q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight",
         "v_proj.weight": "v_proj.weight", "inner_attn_ln.weight": "norm.weight",
         "inner_attn_ln.bias": "norm.bias", "proj.weight": "out_proj.weight",
         "proj.bias": "out_proj.bias"}
_WB = ("weight", "bias")


def _block_key(rest: str, pool: Sequence[str]) -> str | None:
    """Our name (inside ``blocks.{b}.``) of a released block key, or None if unknown."""
    m = re.fullmatch(r"cross_attn\.(\d+)\.(.+)", rest)
    if m and int(m.group(1)) < len(pool) and m.group(2) in _ATTN:
        return f"extractors.{pool[int(m.group(1))]}.attn.{_ATTN[m.group(2)]}"
    m = re.fullmatch(r"norm([12])\.(\d+)\.(weight|bias)", rest)
    if m and int(m.group(2)) < len(pool):
        norm = "norm_x" if m.group(1) == "1" else "norm_f"
        return f"extractors.{pool[int(m.group(2))]}.{norm}.{m.group(3)}"
    m = re.fullmatch(r"self_attn\.(.+)", rest)
    if m and m.group(1) in _ATTN:
        return f"self_attn.{_ATTN[m.group(1)]}"
    m = re.fullmatch(r"(norm3|norm4|mlp\.w1|mlp\.w2|mlp\.w3)\.(weight|bias)", rest)
    if m:
        return rest
    m = re.fullmatch(r"mlp\.ffn_ln\.(weight|bias)", rest)
    if m:
        return f"mlp.norm.{m.group(1)}"
    m = re.fullmatch(r"gate\.([02])\.(weight|bias)", rest)
    if m:
        return f"gate.{'fc1' if m.group(1) == '0' else 'fc2'}.{m.group(2)}"
    return None


def adapter_key(rel: str, pool: Sequence[str]) -> str | None:
    """Our adapter key for a released one (after ``model.mm_projector.``); None if unknown.

    ``pool`` names the experts in the released index order j = 0, 1, ...
    """
    if rel == "pos_embed":
        return "pos_embed.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", rel)
    if m:
        inner = _block_key(m.group(2), pool)
        return f"blocks.{m.group(1)}.{inner}" if inner else None
    m = re.fullmatch(r"downsample\.([02])\.b1\.(.+)", rel)
    if m:
        stage = "stage1" if m.group(1) == "0" else "stage2"
        rest = m.group(2)
        if rest in _STAGE:
            return f"downsampler.{stage}.{_STAGE[rest]}"
        head, _, leaf = rest.rpartition(".")
        if head in _STAGE_NORMS and leaf in _WB:
            return f"downsampler.{stage}.{_STAGE_NORMS[head]}.{leaf}"
        return None
    m = re.fullmatch(r"mlp\.([02])\.(weight|bias)", rel)
    if m:
        return f"projector.{m.group(1)}.{m.group(2)}"
    return None


@dataclass
class KeyGroups:
    """Every source key, sorted into the part it belongs to (source key -> our key)."""

    llm: dict[str, str] = field(default_factory=dict)
    adapter: dict[str, str] = field(default_factory=dict)
    rope: list[str] = field(default_factory=list)
    text_encoder: dict[str, str] = field(default_factory=dict)
    base_tower: dict[str, str] = field(default_factory=dict)
    experts: dict[str, list[str]] = field(default_factory=dict)
    recomputed: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"llm": len(self.llm), "adapter": len(self.adapter),
                "adapter_rope_verified": len(self.rope), "text_encoder": len(self.text_encoder),
                "base_tower": len(self.base_tower),
                "experts_by_reference": sum(len(v) for v in self.experts.values()),
                "recomputed_buffers": len(self.recomputed)}


def group_keys(keys: Iterable[str], pool: Sequence[str]) -> KeyGroups:
    """Sort the released state-dict keys; keys no rule places end up in ``unplaced``."""
    groups = KeyGroups()
    for key in sorted(keys):
        if any(p.search(key) for p in RECOMPUTED):
            groups.recomputed.append(key)
        elif key.startswith(LLM_PREFIXES):
            groups.llm[key] = key
        elif key.startswith(TEXT_PREFIX):
            groups.text_encoder[key] = key[len(TEXT_PREFIX):]
        elif key.startswith(ADAPTER_PREFIX):
            rel = key[len(ADAPTER_PREFIX):]
            if _ROPE.fullmatch(rel) and _rope_index_ok(rel, pool):
                groups.rope.append(key)
            elif (ours := adapter_key(rel, pool)) is not None:
                groups.adapter[key] = ours
            else:
                groups.unplaced.append(key)
        elif key.startswith(TOWER_PREFIX):
            index, _, rest = key[len(TOWER_PREFIX):].partition(".")
            if index == "0" and rest:
                groups.base_tower[key] = rest
            elif index.isdigit() and 1 <= int(index) <= len(pool) and rest:
                groups.experts.setdefault(pool[int(index) - 1], []).append(key)
            else:
                groups.unplaced.append(key)
        else:
            groups.unplaced.append(key)
    return groups


def _rope_index_ok(rel: str, pool: Sequence[str]) -> bool:
    m = _ROPE.fullmatch(rel)
    return m is not None and (m.group(3) is None or int(m.group(3)) < len(pool))


def clip_key(rel: str, model_keys: set[str]) -> str | None:
    """Our ``CLIPVisionModel`` key for a released tower key (``vision_model.*``): the same
    name, or without the ``vision_model.`` prefix where the installed transformers drops it."""
    if rel in model_keys:
        return rel
    if rel.startswith("vision_model.") and rel[len("vision_model."):] in model_keys:
        return rel[len("vision_model."):]
    return None


def rope_tolerance(dtype: torch.dtype) -> float:
    """How far a stored RoPE table may be from ours: 1e-4 in float32 and wider types, else one
    unit in the last place of ``dtype`` at 1 (its values lie in [-1, 1], and a table computed in
    float32 and then cast may round the other way than ours)."""
    return max(ROPE_TOLERANCE, torch.finfo(dtype).eps if dtype.is_floating_point else 0.0)


def verify_rope(tables: dict[str, Tensor], head_dim: int, grid: int) -> None:
    """Check released ``rope.freqs_cos/sin`` buffers against our 2D-RoPE table, in whatever
    float dtype they were stored.

    They are deterministic, so they are recomputed, not imported; our table is cast to the
    stored dtype and a difference beyond :func:`rope_tolerance` (or another shape) means a
    layout we do not reproduce, and names the key.
    """
    angles = rotary_2d_angles(head_dim, grid)
    expected = {"cos": angles.cos(), "sin": angles.sin()}
    for key, table in sorted(tables.items()):
        want = expected[key.rsplit("_", 1)[-1]]
        if tuple(table.shape) != tuple(want.shape):
            raise ReferenceImportError(
                f"{key}: rope table of shape {tuple(table.shape)}, expected {tuple(want.shape)} "
                f"(grid {grid}x{grid}, head dim {head_dim} = width / {RELEASED_HEADS} heads)")
        if not table.dtype.is_floating_point:
            raise ReferenceImportError(f"{key}: rope table stored as {table.dtype}; expected a "
                                       "float dtype")
        tolerance = rope_tolerance(table.dtype)
        diff = (table.float() - want.to(table.dtype).float()).abs().max().item()
        if not diff <= tolerance:
            raise ReferenceImportError(
                f"{key}: rope table differs from our 2D rotary layout by {diff:.3g} "
                f"(> {tolerance:.3g} at {str(table.dtype).removeprefix('torch.')}); this "
                "checkpoint uses a rotary layout we do not reproduce")


def _names(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def names(items: Sequence[str], limit: int = 12) -> str:
    """A readable, bounded list of keys for an error message."""
    return _names(sorted(items), limit)

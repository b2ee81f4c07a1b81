"""The released checkpoint's ``config.json``: every field classified, none guessed.

It is a Llama config plus LLaVA/MoVA fields. Llama fields go to the LLM's own config; MoVA
fields map to ours after a check of their values; LLaVA training knobs that do not change
inference are listed as ignored in the import report; any other field is an error naming it,
unless the user lists it in ``ignore_fields``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

from mova.convert import ReferenceImportError
from mova.convert.reference_keys import RELEASED_HEADS
from mova.experts.registry import DEFAULT_POOL

# Llama/PretrainedConfig fields of transformers 4.3x that the installed LlamaConfig may name
# differently (it reads them all through LlamaConfig.from_dict).
LEGACY_LLAMA_FIELDS = frozenset({
    "rope_theta", "rope_scaling", "torch_dtype", "use_cache", "pretraining_tp", "attention_bias",
    "attention_dropout", "mlp_bias", "head_dim", "_name_or_path", "transformers_version",
    "architectures", "model_type",
})
MODEL_TYPES = ("mova_llama", "llama")

# Fields that change nothing at inference (training knobs of LLaVA / MoVA), with the reason.
IGNORED = {
    "mm_use_im_patch_token": "training knob: adds an unused <im_patch> token",
    "tune_mm_mlp_adapter": "training knob (stage-1 adapter tuning)",
    "freeze_mm_mlp_adapter": "training knob",
    "mm_projector_lr": "training knob (learning rate)",
    "tokenizer_model_max_length": "training knob (sequence cut)",
    "tokenizer_padding_side": "training knob (right padding)",
    "image_grid_pinpoints": "only used by anyres, which the released model does not run",
    "use_mm_proj": "always true for a multimodal LLaVA model",
    "ft_vision_tower_last_n_layer": "training knob (which base layers train)",
    "s2_scales": "only used when s2 is on",
    "image_aspect_ratio": "preprocessing knob; ours resizes the whole image to a square",
}
# MoVA fields we map (or check): name -> what it becomes.
MAPPED = {
    "mm_projector_type": "must be 'mov_adapter'",
    "mm_hidden_size": "adapter width C = base.hidden_size",
    "image_feat_size": "base grid G; base.image_size = G * patch (14)",
    "expert_channels": "each expert's channels, pool order, checked against the built experts",
    "num_projector_layers": "adapter.num_blocks",
    "topk_experts": "adapter.top_k",
    "topk": "adapter.top_k (the released trainer's name; must agree with topk_experts)",
    "num_routing_tokens": "adapter.routing_pool = sqrt(image tokens / routing tokens)",
    "mm_projector_text_encoder": "the BERT config and tokenizer (unless overridden)",
    "mm_projector_freeze_text_encoder": "text_encoder.trainable = not this",
    "mm_vision_tower": "base (entry 0) and experts (entries 1..7) by reference",
    "mm_vision_select_layer": "base.feature_layer",
    "mm_vision_select_feature": "must be 'patch'",
    "mm_use_im_start_end": "must be false",
    "mm_patch_merge_type": "must be 'flat'",
    "ft_vision_tower": "base.trainable",
    "s2": "must be false",
}
REQUIRED = ("mm_projector_type", "mm_hidden_size", "hidden_size", "image_feat_size",
            "expert_channels", "num_projector_layers", "mm_vision_tower",
            "mm_vision_select_layer")
RELEASED_PATCH = 14
"""The released code runs the base at ``image_feat_size * 14`` pixels."""


@dataclass
class ReleasedConfig:
    """The released config, read and checked; ``llama`` holds the LLM's own fields."""

    llama: dict[str, Any]
    width: int
    llm_width: int
    grid: int
    expert_channels: list[int]
    num_blocks: int
    top_k: int
    routing_pool: int
    text_encoder: str | None
    freeze_text_encoder: bool
    vision_towers: list[str]
    select_layer: int
    ft_vision_tower: bool
    ignored: dict[str, Any] = field(default_factory=dict)
    user_ignored: dict[str, Any] = field(default_factory=dict)
    mapped: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def llama_config(self) -> LlamaConfig:
        data = {k: v for k, v in self.llama.items()
                if k not in ("model_type", "architectures", "_name_or_path",
                             "transformers_version")
                and not (k == "rope_scaling" and v is None)}
        config = LlamaConfig.from_dict(data)
        config.architectures = ["LlamaForCausalLM"]
        return config


def llama_fields() -> frozenset[str]:
    """Names a Llama ``config.json`` may hold (installed transformers, plus 4.3x names)."""
    return frozenset(LlamaConfig().to_dict()) | LEGACY_LLAMA_FIELDS


def _int(data: dict, name: str, minimum: int = 1) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ReferenceImportError(f"config field {name}={value!r}: expected an int >= {minimum}")
    return value


def _expect(data: dict, name: str, allowed: tuple, default: Any) -> Any:
    value = data.get(name, default)
    if value not in allowed:
        raise ReferenceImportError(f"config field {name}={value!r}: the import supports only "
                                   f"{list(allowed)}")
    return value


def _check_fields(data: dict[str, Any], user_ignore: set[str], known_llama: set[str]) -> None:
    """Every field known (or ignored by the user), the required ones present, and the ones
    with a single supported value holding it."""
    unknown = sorted(k for k in data if k not in known_llama and k not in MAPPED
                     and k not in IGNORED and k not in user_ignore)
    if unknown:
        raise ReferenceImportError(
            f"config.json has field(s) the import does not know: {unknown}; none is guessed. "
            "If they do not matter for inference, pass them as ignore_fields (--ignore-field)")
    missing = [k for k in REQUIRED if k not in data]
    if "topk_experts" not in data and "topk" not in data:
        missing.append("topk_experts")
    if missing:
        raise ReferenceImportError(f"config.json lacks required field(s) {missing}")
    _expect(data, "model_type", MODEL_TYPES, "mova_llama")
    _expect(data, "mm_projector_type", ("mov_adapter",), None)
    _expect(data, "mm_vision_select_feature", ("patch",), "patch")
    _expect(data, "mm_use_im_start_end", (False,), False)
    _expect(data, "mm_patch_merge_type", ("flat",), "flat")
    _expect(data, "s2", (False, None), False)
    if data.get("image_aspect_ratio") not in (None, "square", "pad"):
        raise ReferenceImportError(f"config field image_aspect_ratio="
                                   f"{data.get('image_aspect_ratio')!r}: the released model "
                                   "runs only square/pad images")
    if "topk" in data and "topk_experts" in data and data["topk"] != data["topk_experts"]:
        raise ReferenceImportError(f"config fields topk={data['topk']!r} and topk_experts="
                                   f"{data['topk_experts']!r} disagree")


def _checked_lists(data: dict[str, Any]) -> tuple[list[int], list[str], int]:
    """``expert_channels``, ``mm_vision_tower`` and ``mm_vision_select_layer``, checked."""
    channels = data["expert_channels"]
    if not isinstance(channels, list) or len(channels) != len(DEFAULT_POOL) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ReferenceImportError(f"config field expert_channels={channels!r}: expected "
                                   f"{len(DEFAULT_POOL)} positive ints, pool order "
                                   f"{list(DEFAULT_POOL)}")
    towers = data["mm_vision_tower"]
    if not isinstance(towers, list) or len(towers) != len(DEFAULT_POOL) + 1 or not all(
            isinstance(t, str) and t for t in towers):
        raise ReferenceImportError(f"config field mm_vision_tower={towers!r}: expected a list "
                                   f"of {len(DEFAULT_POOL) + 1} paths/ids (base, then "
                                   f"{list(DEFAULT_POOL)})")
    select = data["mm_vision_select_layer"]
    if isinstance(select, bool) or not isinstance(select, int) or select == 0:
        raise ReferenceImportError(f"config field mm_vision_select_layer={select!r}: expected "
                                   "a non-zero int")
    return list(channels), list(towers), select


def read_released_config(data: dict[str, Any], ignore_fields: Iterable[str] = ()
                         ) -> ReleasedConfig:
    """Classify every field of a released ``config.json``; raise naming any field it cannot
    place or whose value it does not support."""
    user_ignore = set(ignore_fields)
    known_llama = llama_fields()
    _check_fields(data, user_ignore, known_llama)
    channels, towers, select = _checked_lists(data)
    top_k = _int(data, "topk_experts" if "topk_experts" in data else "topk")
    grid, width = _int(data, "image_feat_size"), _int(data, "mm_hidden_size")
    if width % (RELEASED_HEADS * 4):
        raise ReferenceImportError(f"config field mm_hidden_size={width}: the released adapter "
                                   f"splits it into {RELEASED_HEADS} heads whose size must be "
                                   "a multiple of 4")
    out = ReleasedConfig(
        llama={k: v for k, v in data.items() if k in known_llama},
        width=width, llm_width=_int(data, "hidden_size"), grid=grid,
        expert_channels=channels, num_blocks=_int(data, "num_projector_layers"),
        top_k=top_k, routing_pool=_routing_pool(data, grid),
        text_encoder=data.get("mm_projector_text_encoder"),
        freeze_text_encoder=bool(data.get("mm_projector_freeze_text_encoder", False)),
        vision_towers=towers, select_layer=select,
        ft_vision_tower=bool(data.get("ft_vision_tower", False)),
        ignored={k: {"value": data[k], "why": IGNORED[k]} for k in IGNORED if k in data},
        user_ignored={k: data[k] for k in sorted(user_ignore) if k in data},
        mapped={k: data[k] for k in MAPPED if k in data},
    )
    aspect = data.get("image_aspect_ratio")
    released_prep = ("pads it to a square with the mean colour" if aspect == "pad" else
                     "resizes its shortest edge and crops the centre")
    out.notes.append(f"image_aspect_ratio={aspect!r}: for a non-square image the released "
                     f"preprocessing {released_prep}; ours resizes the whole image to a square, "
                     "so such images are seen slightly differently")
    if "num_routing_tokens" not in data:
        out.notes.append(f"num_routing_tokens absent: routing tokens pooled by 2 per side "
                         f"({(grid // 4) ** 2} tokens), the released default of 144 at G = 48")
    return out


def _routing_pool(data: dict[str, Any], grid: int) -> int:
    if grid % 2:
        raise ReferenceImportError(f"config field image_feat_size={grid}: must be even (the "
                                   "downsampler halves it)")
    side = grid // 2
    if "num_routing_tokens" not in data:
        pool = 2
    else:
        tokens = _int(data, "num_routing_tokens")
        root = math.isqrt(tokens)
        if root * root != tokens or side % root:
            raise ReferenceImportError(
                f"config field num_routing_tokens={tokens}: must be a square whose side divides "
                f"the {side}x{side} image-token grid")
        pool = side // root
    if side % pool:
        raise ReferenceImportError(f"image_feat_size={grid}: the {side}x{side} token grid is "
                                   f"not divisible by the routing pool {pool}")
    return pool

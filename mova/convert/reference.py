"""Import the authors' released MoVA checkpoint (LLaVA-style layout, REFERENCE.md) into a
self-describing MoVA checkpoint of ours.

Every state-dict key is placed (LLM, adapter, text encoder, base tower, experts by reference,
rope tables verified and recomputed) or the import fails naming the keys; every tensor of ours
is filled or it fails naming the missing ones; shapes are checked; every config field is
mapped, checked, listed as ignored, or an error (:mod:`mova.convert.reference_config`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaForCausalLM,
)

from mova.builders import build_adapter, ensure_image_token
from mova.checkpoint import write_file_list
from mova.config import (
    PRESETS,
    AdapterConfig,
    ExpertConfig,
    LLMConfig,
    MoVAConfig,
    RoutingConfig,
    TextEncoderConfig,
    VisionEncoderConfig,
)
from mova.conversation import TEMPLATES
from mova.convert import ReferenceImportError
from mova.convert.reference_config import RELEASED_PATCH, ReleasedConfig, read_released_config
from mova.convert.reference_io import WeightFiles, load_mapped
from mova.convert.reference_io import write_safetensors as write_shards
from mova.convert.reference_keys import (
    RELEASED_HEADS,
    KeyGroups,
    clip_key,
    group_keys,
    names,
    verify_rope,
)
from mova.device import torch_dtype
from mova.experts.encoders import BaseEncoder, VisionExpert, build_base_encoder, build_expert
from mova.experts.registry import DEFAULT_POOL, resolve_expert
from mova.modeling import MoVAModel

log = logging.getLogger(__name__)

REPORT_FILE = "import.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ImportReport:
    """What the import placed and where (written as ``import.json`` in the output)."""

    source: str
    out: str
    weights: dict[str, Any]
    key_groups: dict[str, int]
    recomputed_buffers: list[str]
    base_encoder: dict[str, Any]
    text_encoder: dict[str, Any]
    experts: dict[str, dict[str, Any]]
    template: str
    routing_prompt: str
    dtype: str
    mapped_fields: dict[str, Any]
    ignored_fields: dict[str, Any]
    user_ignored_fields: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    safetensors: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_source(src: str | Path) -> Path:
    """A local folder in the released layout, or a hub id (then downloaded, and only then)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if isinstance(src, str) and _HUB_ID.match(src) and not path.exists():
        log.info("downloading %s from the hub", src)
        try:
            return Path(snapshot_download(src))
        except Exception as exc:  # offline, missing repo, no access: say which source
            raise ReferenceImportError(f"source {src!r} is no local folder and the hub "
                                       f"download failed: {exc}") from exc
    raise ReferenceImportError(f"source {src!r} is neither a folder nor a hub id")


def template_for(tokenizer: Any) -> str:
    """The released answer template matching the LLM: Llama-3 headers -> ``mova_llama3``."""
    vocab = tokenizer.get_vocab()
    if "<|eot_id|>" in vocab and "<|start_header_id|>" in vocab:
        return "mova_llama3"
    return "vicuna_v1"


def _expert_refs(released: ReleasedConfig, expert_paths: Mapping[str, str] | None
                 ) -> dict[str, str]:
    overrides = dict(expert_paths or {})
    unknown = sorted(set(overrides) - set(DEFAULT_POOL))
    if unknown:
        raise ReferenceImportError(f"expert_paths names unknown expert(s) {unknown}; the "
                                   f"released pool is {list(DEFAULT_POOL)}")
    return {name: str(overrides.get(name, released.vision_towers[j + 1]))
            for j, name in enumerate(DEFAULT_POOL)}


def _load_config(cls: Any, source: str, what: str, hint: str) -> Any:
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ReferenceImportError(f"{what}: cannot read a {cls.__name__} from {source!r} "
                                   f"({exc}); {hint}") from exc


def _mova_config(released: ReleasedConfig, clip: CLIPVisionConfig, bert: BertConfig,
                 refs: Mapping[str, str], template: str, preset: str, dtype: str
                 ) -> MoVAConfig:
    llama = released.llama_config()
    if clip.hidden_size != released.width:
        raise ReferenceImportError(f"config field mm_hidden_size={released.width} but the base "
                                   f"encoder has width {clip.hidden_size}")
    if clip.patch_size != RELEASED_PATCH:
        raise ReferenceImportError(f"base encoder patch size {clip.patch_size}: the released "
                                   f"code runs it at image_feat_size * {RELEASED_PATCH} pixels")
    try:
        return MoVAConfig(
            base=VisionEncoderConfig(
                family="clip", preset=preset, image_size=released.grid * RELEASED_PATCH,
                native_image_size=clip.image_size, patch_size=clip.patch_size,
                hidden_size=clip.hidden_size, num_layers=clip.num_hidden_layers,
                num_heads=clip.num_attention_heads, intermediate_size=clip.intermediate_size,
                feature_layer=released.select_layer, trainable=released.ft_vision_tower),
            experts=[ExpertConfig(name=n, preset=preset, pretrained=refs[n])
                     for n in DEFAULT_POOL],
            adapter=AdapterConfig(num_heads=RELEASED_HEADS, num_blocks=released.num_blocks,
                                  top_k=released.top_k, routing_pool=released.routing_pool),
            text_encoder=TextEncoderConfig(
                family="bert", preset=preset, hidden_size=bert.hidden_size,
                num_layers=bert.num_hidden_layers, num_heads=bert.num_attention_heads,
                intermediate_size=bert.intermediate_size, max_length=512,
                trainable=not released.freeze_text_encoder),
            llm=LLMConfig(
                family="llama", preset=preset, hidden_size=llama.hidden_size,
                num_layers=llama.num_hidden_layers, num_heads=llama.num_attention_heads,
                num_kv_heads=llama.num_key_value_heads or llama.num_attention_heads,
                intermediate_size=llama.intermediate_size,
                max_position_embeddings=llama.max_position_embeddings, chat_template=template),
            routing=RoutingConfig(max_experts=3, max_new_tokens=16, prompt="released"),
            dtype=dtype,
        ).validate()
    except ValueError as exc:
        raise ReferenceImportError(f"the released config does not make a valid MoVA config: "
                                   f"{exc}") from exc


def _build_experts(config: MoVAConfig, released: ReleasedConfig) -> dict[str, VisionExpert]:
    experts = {}
    for j, expert_cfg in enumerate(config.experts):
        resolved = resolve_expert(expert_cfg)
        want = released.expert_channels[j]
        if resolved.channels != want:
            raise ReferenceImportError(
                f"expert {expert_cfg.name!r}: expert_channels[{j}]={want} but the "
                f"{expert_cfg.preset!r} preset emits {resolved.channels} channels")
        try:
            expert = build_expert(resolved)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ReferenceImportError(
                f"expert {expert_cfg.name!r}: cannot load it from {resolved.pretrained!r} "
                f"({exc}); pass expert_paths / --expert {expert_cfg.name}=PATH with a folder "
                "in our expert format") from exc
        if expert.out_channels != want:
            raise ReferenceImportError(f"expert {expert_cfg.name!r}: loaded encoder emits "
                                       f"{expert.out_channels} channels, expert_channels[{j}]="
                                       f"{want}")
        experts[expert_cfg.name] = expert
    return experts


def _build_llm(released: ReleasedConfig, weights: WeightFiles, groups: KeyGroups,
               tokenizer: Any, dtype: torch.dtype) -> LlamaForCausalLM:
    llama = released.llama_config()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, then overwrite
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        llm = LlamaForCausalLM._from_config(llama, attn_implementation="sdpa", dtype=dtype)
    tied = bool(llama.tie_word_embeddings) and "lm_head.weight" not in groups.llm
    load_mapped(llm, weights, groups.llm, "LLM",
                optional=("lm_head.weight",) if tied else ())
    if tied:
        llm.tie_weights()
    rows = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # the image placeholder token was added
        llm.resize_token_embeddings(len(tokenizer))
    return llm.eval()


def _build_base(config: MoVAConfig, clip: CLIPVisionConfig, base_src: str, weights: WeightFiles,
                groups: KeyGroups) -> BaseEncoder:
    if not groups.base_tower:
        cfg = VisionEncoderConfig(**{**asdict(config.base), "pretrained": base_src})
        return build_base_encoder(cfg)
    running = CLIPVisionConfig.from_dict({**clip.to_dict(), "image_size": config.base.image_size})
    model = CLIPVisionModel(running)
    ours = set(model.state_dict())
    mapping = {src: clip_key(rel, ours) for src, rel in groups.base_tower.items()}
    unknown = [src for src, dst in mapping.items() if dst is None]
    if unknown:
        raise ReferenceImportError(f"base tower: {len(unknown)} key(s) match no tensor of "
                                   f"CLIPVisionModel: {names(unknown)}")
    load_mapped(model, weights, mapping, "base tower")  # type: ignore[arg-type]
    return BaseEncoder(model, config.base.feature_layer)


def _build_text_encoder(bert: BertConfig, text_tokenizer: Any, weights: WeightFiles,
                        groups: KeyGroups) -> BertModel:
    bert.vocab_size = len(text_tokenizer)  # the released code resizes BERT to its tokenizer
    model = BertModel(bert, add_pooling_layer=False)
    load_mapped(model, weights, groups.text_encoder, "text encoder")
    return model.eval()


def _source_dtype(weights: WeightFiles, groups: KeyGroups) -> str:
    key = next(iter(groups.llm), None)
    if key is None:
        return "float32"
    return _DTYPE_NAMES.get(weights.load([key])[key].dtype, "float32")


def _check_arguments(out: str | Path, expert_preset: str, template: str | None,
                     overwrite: bool) -> Path:
    if expert_preset not in PRESETS:
        raise ReferenceImportError(f"expert_preset={expert_preset!r}; expected one of {PRESETS}")
    if template is not None and template not in TEMPLATES:
        raise ReferenceImportError(f"template={template!r}; expected one of {sorted(TEMPLATES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ReferenceImportError(f"output folder {out} exists and is not empty "
                                   "(pass overwrite=True / --overwrite to replace it)")
    return out


def _open_source(src: str | Path, ignore_fields: Iterable[str]) -> tuple[Path, Any, Any, Any]:
    """The released checkpoint's folder, config, weight files and keys grouped by part; every
    key must have a place."""
    folder = resolve_source(src)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ReferenceImportError(f"{folder} has no config.json")
    released = read_released_config(json.loads(config_path.read_text()), ignore_fields)
    weights = WeightFiles(folder)
    groups = group_keys(weights.keys(), DEFAULT_POOL)
    if groups.unplaced:
        raise ReferenceImportError(f"{len(groups.unplaced)} checkpoint key(s) cannot be placed: "
                                   f"{names(groups.unplaced)}")
    for part, found in (("LLM", groups.llm), ("adapter", groups.adapter),
                        ("text encoder", groups.text_encoder)):
        if not found:
            raise ReferenceImportError(f"the checkpoint holds no {part} keys")
    return folder, released, weights, groups


@dataclass
class _Sources:
    """Where the parts without weights in the released state come from, loaded."""

    tokenizer: Any
    template: str
    text_src: str
    base_src: str
    clip: CLIPVisionConfig
    bert: BertConfig


def _sources(folder: Path, released: Any, template: str | None, base_path: str | None,
             text_encoder_path: str | None) -> _Sources:
    try:
        tokenizer = ensure_image_token(AutoTokenizer.from_pretrained(folder))
    except (OSError, ValueError) as exc:
        raise ReferenceImportError(f"{folder}: cannot load the LLM tokenizer ({exc})") from exc
    text_src = text_encoder_path or released.text_encoder
    if not text_src:
        raise ReferenceImportError("config.json lacks mm_projector_text_encoder; pass "
                                   "text_encoder_path / --text-encoder")
    base_src = base_path or released.vision_towers[0]
    hint_base = "pass base_path / --base with a CLIP folder"
    clip = _load_config(CLIPVisionConfig, base_src, "base encoder (mm_vision_tower[0])", hint_base)
    bert = _load_config(BertConfig, text_src, "text encoder (mm_projector_text_encoder)",
                        "pass text_encoder_path / --text-encoder with a BERT folder")
    return _Sources(tokenizer, template or template_for(tokenizer), text_src, base_src, clip,
                    bert)


def _assemble(config: MoVAConfig, released: Any, src: _Sources, weights: Any, groups: Any,
              dtype: str) -> MoVAModel:
    """Our model with every released tensor placed (the weights are released afterwards)."""
    experts = _build_experts(config, released)
    adapter = build_adapter(config)
    verify_rope(weights.load(groups.rope), released.width // RELEASED_HEADS, released.grid)
    load_mapped(adapter, weights, groups.adapter, "adapter")
    try:
        text_tokenizer = AutoTokenizer.from_pretrained(src.text_src)
    except (OSError, ValueError) as exc:
        raise ReferenceImportError(f"text encoder: no tokenizer at {src.text_src!r} "
                                   f"({exc})") from exc
    text_encoder = _build_text_encoder(src.bert, text_tokenizer, weights, groups)
    base = _build_base(config, src.clip, src.base_src, weights, groups)
    llm = _build_llm(released, weights, groups, src.tokenizer, torch_dtype(dtype))
    weights.release()
    model = MoVAModel(config, llm=llm, tokenizer=src.tokenizer, text_encoder=text_encoder,
                      text_tokenizer=text_tokenizer, base_encoder=base, experts=experts,
                      adapter=adapter)
    for part in (model.text_encoder, model.base_encoder, model.adapter):
        part.to(torch_dtype(dtype))  # experts keep their stored dtype (their fingerprints)
    model.apply_trainability()
    model.eval()
    return model


def import_reference(src: str | Path, out: str | Path, *,
                     expert_paths: Mapping[str, str] | None = None,
                     base_path: str | None = None, text_encoder_path: str | None = None,
                     template: str | None = None, ignore_fields: Iterable[str] = (),
                     expert_preset: str = "full", write_safetensors: str | Path | None = None,
                     dtype: str | None = None, overwrite: bool = False) -> ImportReport:
    """Import a released MoVA checkpoint from ``src`` into our checkpoint folder ``out``.

    ``expert_paths`` maps expert names to their own checkpoints (default: the config's
    ``mm_vision_tower`` entries); ``base_path`` and ``text_encoder_path`` override where the
    base CLIP and the BERT config/tokenizer come from; ``template`` overrides the answer
    template (default: ``mova_llama3`` for a Llama-3 tokenizer, else ``vicuna_v1``);
    ``ignore_fields`` are config fields the user declares irrelevant; ``dtype`` defaults to
    the checkpoint's. ``write_safetensors`` (a folder) also writes the source state dict there as
    safetensors shards with an index.
    """
    start = time.perf_counter()
    out = _check_arguments(out, expert_preset, template, overwrite)
    folder, released, weights, groups = _open_source(src, ignore_fields)
    src_parts = _sources(folder, released, template, base_path, text_encoder_path)
    refs = _expert_refs(released, expert_paths)
    dtype = dtype or _source_dtype(weights, groups)
    config = _mova_config(released, src_parts.clip, src_parts.bert, refs, src_parts.template,
                          expert_preset, dtype)
    model = _assemble(config, released, src_parts, weights, groups, dtype)
    path = model.save_pretrained(out, experts="reference")
    report = ImportReport(
        source=str(src), out=str(path),
        weights={"folder": str(folder), "layout": weights.entry,
                 "files": [p.name for p in weights.files]},
        key_groups=groups.counts(), recomputed_buffers=groups.recomputed,
        base_encoder={"from": "state_dict" if groups.base_tower else "folder",
                      "config": src_parts.base_src, "image_size": config.base.image_size},
        text_encoder={"config_and_tokenizer": src_parts.text_src,
                      "keys": len(groups.text_encoder)},
        experts={n: {"reference": refs[n], "channels": released.expert_channels[j],
                     "source_keys_not_copied": len(groups.experts.get(n, []))}
                 for j, n in enumerate(DEFAULT_POOL)},
        template=src_parts.template, routing_prompt="released", dtype=dtype,
        mapped_fields=released.mapped, ignored_fields=released.ignored,
        user_ignored_fields=released.user_ignored, notes=list(released.notes))
    if write_safetensors is not None:
        report.safetensors = str(write_shards(weights, write_safetensors))
        weights.release()
    report.seconds = round(time.perf_counter() - start, 2)
    (path / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    write_file_list(path)  # the checkpoint's file list (written last) now includes the report
    log.info("imported %s into %s in %.1f s", src, path, report.seconds)
    return report

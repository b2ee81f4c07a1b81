"""Self-describing MoVA checkpoints: safetensors + JSON, never pickle.

Layout of a checkpoint folder::

    config.json          the MoVAConfig
    components.json      where each part lives (format/version, experts copied or referenced)
    llm/                 transformers save_pretrained of the LLM and its tokenizer
    text_encoder/        the BERT text encoder and its tokenizer
    base_encoder/        the CLIP vision model, already at its running resolution
    adapter.safetensors  the MoV-Adapter
    experts/<name>/      each frozen expert (transformers folder + mova_head.safetensors), or
                         nothing when stored by reference (its pretrained id + a fingerprint)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BertModel
from transformers.modeling_utils import PreTrainedModel

from mova.builders import build_adapter, ensure_image_token
from mova.config import MoVAConfig
from mova.device import place, torch_dtype
from mova.experts.encoders import HEAD_WEIGHTS, VisionExpert, build_base_encoder, build_expert
from mova.experts.registry import resolve_expert

log = logging.getLogger(__name__)

FORMAT = "mova-checkpoint"
VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
FILES = "files.json"  # written last: every other file with its size and SHA-256
COMPONENTS = "components.json"  # where each part of the checkpoint lives


class CheckpointError(ValueError):
    """A checkpoint folder that is missing a file or does not match what it declares."""


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameter and buffer names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _backbone(expert: VisionExpert) -> PreTrainedModel:
    for child in expert.children():
        if isinstance(child, PreTrainedModel):
            return child
    raise TypeError(f"{type(expert).__name__} holds no transformers model")


def _head_state(expert: VisionExpert) -> dict[str, torch.Tensor]:
    backbone = _backbone(expert)
    prefix = next(n for n, c in expert.named_children() if c is backbone) + "."
    return {k: v.contiguous() for k, v in expert.state_dict().items() if not k.startswith(prefix)}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint is missing {what}: {path}")
    return path


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 8 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_file_list(folder: Path) -> dict:
    """Record every file of a checkpoint folder (size and SHA-256) in ``files.json``, which
    marks the checkpoint complete: publishers write it last, readers require it."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size,
                                                "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FILES}
    listing = {"format": f"{FORMAT}-files", "version": VERSION, "files": files}
    (folder / FILES).write_text(json.dumps(listing, indent=2) + "\n")
    return listing


def check_complete(path: str | Path) -> dict:
    """The checkpoint's file list, after checking that every listed file is there (sizes and
    digests are checked when a checkpoint is copied, see ``pipelines.common.checkpoint_store``); a
    missing list or file is a :class:`CheckpointError` naming it."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    listing_path = root / FILES
    if not listing_path.is_file():
        raise CheckpointError(f"checkpoint {root} has no {FILES} (the file written last when a "
                              "checkpoint is complete): it is incomplete, still being written, "
                              "or from an older version of mova")
    listing = json.loads(listing_path.read_text())
    missing = [name for name in listing.get("files", {}) if not (root / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {root} is incomplete: missing "
                              f"{', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    return listing


def read_components(path: str | Path) -> dict:
    path = Path(path)
    check_complete(path)
    data = json.loads(_require(path / COMPONENTS, COMPONENTS).read_text())
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise CheckpointError(f"{path / COMPONENTS} is not a {FORMAT} v{VERSION} file")
    return data


def llm_folder(path: str | Path) -> Path:
    """The LLM's folder of a local checkpoint: a plain Hugging Face folder (what vLLM and the
    LLM's tokenizer read)."""
    return Path(path) / read_components(path)["llm"]


def load_config(path: str | Path) -> MoVAConfig:
    return MoVAConfig.load(_require(Path(path) / "config.json", "config.json"))


def _load_expert(root: Path, config: MoVAConfig, name: str, entry: dict) -> VisionExpert:
    expert_cfg = next(e for e in config.experts if e.name == name)
    resolved = resolve_expert(expert_cfg)
    source = entry.get("reference") or str(_require(root / entry["path"], f"expert {name!r}"))
    resolved = type(resolved)(spec=resolved.spec, size=resolved.size, pretrained=source)
    expert = build_expert(resolved)
    fingerprint = entry.get("fingerprint")
    if fingerprint and state_fingerprint(expert) != fingerprint:
        # A model saved in bf16 fingerprinted its experts in bf16, while a referenced expert
        # loads in its own (fp32) weights: compare again in the checkpoint's dtype.
        expert.to(torch_dtype(config.dtype))
    if fingerprint and state_fingerprint(expert) != fingerprint:
        raise CheckpointError(
            f"expert {name!r} loaded from {source} does not match the weights the checkpoint "
            "was saved with (fingerprint differs)"
        )
    return expert


def expert_cache_key(resolved, fingerprint: str) -> str:
    """Key of an expert's cached features: its family, input recipe, sizes and weights.

    Any change to how the expert is built, fed or weighted gives a new key, so a changed
    expert never serves stale features.
    """
    payload = {
        "family": resolved.spec.family,
        "input": dataclasses.asdict(resolved.spec.input),
        "size": dataclasses.asdict(resolved.size),
        "weights": fingerprint,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_expert(path: str | Path, name: str) -> tuple[VisionExpert, object, str]:
    """Load one frozen expert of a checkpoint (without the rest of the model).

    Returns (expert, resolved spec, cache key).
    """
    root = Path(path)
    components = read_components(root)
    config = load_config(root)
    if name not in components["experts"]:
        raise CheckpointError(f"checkpoint {root} has no expert {name!r}; it has "
                              f"{sorted(components['experts'])}")
    expert = _load_expert(root, config, name, components["experts"][name])
    resolved = resolve_expert(next(e for e in config.experts if e.name == name))
    fingerprint = components["experts"][name].get("fingerprint") or state_fingerprint(expert)
    return expert, resolved, expert_cache_key(resolved, fingerprint)


def expert_cache_keys(path: str | Path) -> dict[str, str]:
    """Cache keys of every expert of a checkpoint, from its recorded fingerprints (no loading)."""
    root = Path(path)
    components = read_components(root)
    config = load_config(root)
    return {
        e.name: expert_cache_key(resolve_expert(e), components["experts"][e.name]["fingerprint"])
        for e in config.experts
    }


SKIPPABLE = ("llm", "text_encoder", "base_encoder", "experts")


def load_parts(path: str | Path, skip: Collection[str] = ()) -> tuple[MoVAConfig, dict[str, Any]]:
    """The config and every part of a checkpoint, as keyword arguments of the model. Parts in
    ``skip`` (of :data:`SKIPPABLE`) are not read at all: the LLM, text and base encoders become
    None, the experts weightless placeholders (their names kept); tokenizers, the adapter and
    the config are always read. A serving replica loads only what it runs this way."""
    unknown = set(skip) - set(SKIPPABLE)
    if unknown:
        raise ValueError(f"skip={sorted(unknown)}; expected some of {list(SKIPPABLE)}")
    root = Path(path)
    components = read_components(root)
    config = load_config(root)
    missing = set(config.expert_names) ^ set(components["experts"])
    if missing:
        raise CheckpointError(f"{root}: config.json and components.json disagree on experts "
                              f"{sorted(missing)}")
    llm_dir = _require(root / components["llm"], "the LLM folder")
    text_dir = _require(root / components["text_encoder"], "the text encoder folder")
    parts: dict[str, Any] = {
        "tokenizer": ensure_image_token(AutoTokenizer.from_pretrained(llm_dir)),
        "text_tokenizer": AutoTokenizer.from_pretrained(text_dir),
        "adapter": _load_adapter(root, config, components),
        "llm": None, "text_encoder": None, "base_encoder": None,
        "experts": {n: nn.Identity() for n in config.expert_names},
    }
    if "llm" not in skip:
        parts["llm"] = AutoModelForCausalLM.from_pretrained(
            llm_dir, attn_implementation=config.llm.attn_implementation)
    if "text_encoder" not in skip:
        parts["text_encoder"] = BertModel.from_pretrained(text_dir, add_pooling_layer=False)
    if "base_encoder" not in skip:
        base_cfg = copy.deepcopy(config.base)
        base_cfg.pretrained = str(_require(root / components["base_encoder"], "the base encoder"))
        parts["base_encoder"] = build_base_encoder(base_cfg)
    if "experts" not in skip:
        parts["experts"] = {n: _load_expert(root, config, n, components["experts"][n])
                            for n in config.expert_names}
    return config, parts


def _load_adapter(root: Path, config: MoVAConfig, components: dict) -> nn.Module:
    adapter = build_adapter(config)
    state = load_file(str(_require(root / components["adapter"], "the adapter weights")))
    try:
        adapter.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{root / components['adapter']} does not fit the adapter of config.json: {exc}"
        ) from exc
    return adapter


def _save(model: Any, path: Path, experts: str) -> Path:
    if experts not in ("copy", "reference"):
        raise ValueError(f"experts={experts!r}; expected 'copy' or 'reference'")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.config.to_json(tmp / "config.json")
        model.llm.save_pretrained(tmp / "llm")
        model.tokenizer.save_pretrained(tmp / "llm")
        model.text_encoder.save_pretrained(tmp / "text_encoder")
        model.text_tokenizer.save_pretrained(tmp / "text_encoder")
        model.base_encoder.model.save_pretrained(tmp / "base_encoder")
        save_file({k: v.contiguous() for k, v in model.adapter.state_dict().items()},
                  str(tmp / ADAPTER_FILE))
        entries = {}
        for name, expert in model.experts.items():
            entry = {"fingerprint": state_fingerprint(expert)}
            if experts == "reference":
                ref = model.resolved[name].pretrained
                if not ref:
                    raise ValueError(f"expert {name!r} has no 'pretrained' id, so it cannot be "
                                     "stored by reference; save with experts='copy'")
                entry["reference"] = ref
            else:
                folder = tmp / "experts" / name
                _backbone(expert).save_pretrained(folder)
                head = _head_state(expert)
                if head:
                    save_file(head, str(folder / HEAD_WEIGHTS))
                entry["path"] = f"experts/{name}"
            entries[name] = entry
        components = {"format": FORMAT, "version": VERSION, "llm": "llm",
                      "text_encoder": "text_encoder", "base_encoder": "base_encoder",
                      "adapter": ADAPTER_FILE, "experts": entries}
        (tmp / COMPONENTS).write_text(json.dumps(components, indent=2) + "\n")
        write_file_list(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved MoVA checkpoint to %s", path)
    return path


class CheckpointMixin:
    """``save_pretrained`` / ``from_pretrained`` for :class:`mova.modeling.MoVAModel`."""

    def save_pretrained(self, path: str | Path, *, experts: str = "copy") -> Path:
        """Write this model to ``path`` atomically (a temp folder renamed into place).

        ``experts="reference"`` stores each frozen expert as its ``pretrained`` id plus a
        weight fingerprint instead of a copy (every expert must then have ``pretrained``).
        """
        return _save(self, Path(path), experts)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        skip: Collection[str] = ()) -> Any:
        """Load a checkpoint written by :meth:`save_pretrained`, in the dtype it was saved
        in, on ``device`` (``auto``: CUDA when available). Parts in ``skip`` are never read
        (see :func:`load_parts`), so only what is kept reaches the device."""
        config, parts = load_parts(path, skip)
        model = cls(config, **parts)
        place(model, device, config.dtype)
        model.apply_trainability()
        model.eval()
        return model

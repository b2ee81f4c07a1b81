"""Batch preparation shared by training and labelling: a manifest row -> a prepared row ->
the tensors ``MoVAModel.forward`` takes.

Each prepared row is one sample: token ids and labels (image placeholder expanded to the
adapter's tokens, or to the routing tokens for routing-instruction rows), the base encoder's
pixels, the gate text's ids, the routing label as a 0/1 mask, and for each routed expert either
its cached native features (``features=cached``, fetched from the cache index with ranged
reads) or its prepared input (``features=compute``), serialised with safetensors so that ragged
tensors fit Arrow binary columns. :func:`collate` turns a batch of rows into model inputs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from transformers import AutoTokenizer

from mova.builders import ensure_image_token
from mova.checkpoint import expert_cache_keys, load_config, read_components
from mova.conversation import collate as pad
from mova.conversation import gate_text, get_template, tokenize_conversation, user_questions
from mova.experts.preprocess import ImageProcessor
from mova.experts.registry import resolve_expert
from mova.images import image_hash, load_image
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.feature_cache import FeatureCache
from pipelines.common.manifests.schema import Sample
from pipelines.common.manifests.stream import samples_of
from pipelines.common.manifests.validate import resolve_image

log = logging.getLogger(__name__)

FEATURE_MODES = ("cached", "compute")


@dataclass(frozen=True)
class PrepareSpec:
    """What a data worker needs to prepare rows (picklable, small)."""

    checkpoint: str  # its URI: each process preparing rows resolves its own local copy
    cache: str | None
    features: str
    max_length: int | None


@functools.lru_cache(maxsize=4)
def _context(uri: str) -> dict[str, Any]:
    """Tokenizers, template, processor and cache keys of a checkpoint, once per process (from
    its configs and tokenizers alone: preparing rows needs no weights)."""
    checkpoint = local_checkpoint(uri, parts=["meta"])
    config = load_config(checkpoint)
    components = read_components(checkpoint)
    tokenizer = ensure_image_token(
        AutoTokenizer.from_pretrained(storage.join(checkpoint, components["llm"])))
    text_tokenizer = AutoTokenizer.from_pretrained(
        storage.join(checkpoint, components["text_encoder"]))
    resolved = [resolve_expert(e) for e in config.experts]
    return {
        "config": config, "tokenizer": tokenizer, "text_tokenizer": text_tokenizer,
        "template": get_template(config.llm.chat_template),
        "processor": ImageProcessor(config.base.image_size, resolved),
        "keys": expert_cache_keys(checkpoint),
    }


@functools.lru_cache(maxsize=4)
def feature_cache(root: str) -> FeatureCache:
    """One cache object (and so one loaded index per expert) per process."""
    return FeatureCache(root)


def tokenize_sample(sample: Sample, spec: PrepareSpec) -> dict[str, Any]:
    """Everything of a sample but its image: ids, labels, gate ids, the expert mask."""
    ctx = _context(spec.checkpoint)
    config = ctx["config"]
    routing = sample.kind == "routing"
    n_tokens = config.num_routing_tokens if routing else config.num_image_tokens
    enc = tokenize_conversation(sample.conversations, ctx["tokenizer"], ctx["template"],
                                n_tokens, has_image=bool(sample.image),
                                max_length=spec.max_length)
    gate = ctx["text_tokenizer"](gate_text(user_questions(sample.conversations)),
                                 truncation=True, max_length=config.text_encoder.max_length)
    label = [] if routing or sample.experts is None else list(sample.experts)
    return {
        "id": sample.id, "input_ids": np.asarray(enc["input_ids"], np.int64),
        "labels": np.asarray(enc["labels"], np.int64),
        "gate_input_ids": np.asarray(gate["input_ids"], np.int64),
        "expert_mask": np.asarray([n in label for n in config.expert_names], np.bool_),
        "routing": routing, "_label": label,
    }


def prepare_rows(rows: Sequence[tuple[str, Sample]], spec: PrepareSpec) -> list[dict]:
    """(manifest file, sample) rows -> prepared rows; each image is decoded once and each
    expert's cached features are fetched for the whole batch at once."""
    ctx = _context(spec.checkpoint)
    names = ctx["config"].expert_names
    out, images, hashes = [], [], []
    for file, sample in rows:
        if not sample.image:
            raise ValueError(f"sample {sample.id!r} has no image; text-only samples are not "
                             "supported by training yet")
        prepared = tokenize_sample(sample, spec)
        image = load_image(storage.read_bytes(resolve_image(file, sample.image)))
        prepared["pixel_values"] = ctx["processor"].base([image])[0].numpy()
        out.append(prepared)
        images.append(image)
        hashes.append(image_hash(image) if spec.features == "cached" else "")
    for name in names:
        want = [i for i, p in enumerate(out) if name in p["_label"]]
        for p in out:
            p.setdefault(f"x_{name}", b"")
        if not want:
            continue
        if spec.features == "cached":
            try:
                feats = feature_cache(spec.cache).get_many(name, ctx["keys"][name],
                                                           [hashes[i] for i in want])
            except KeyError as exc:
                raise ValueError(f"sample {out[want[0]]['id']!r}: {exc}; run `mova features` "
                                 "for this manifest first, or train with features=compute"
                                 ) from exc
        else:
            feats = list(ctx["processor"].expert(name, [images[i] for i in want]))
        for i, f in zip(want, feats, strict=True):
            out[i][f"x_{name}"] = pack(f)
    for p in out:
        del p["_label"]
    return out


def prepare_batch(batch: dict[str, np.ndarray], spec: PrepareSpec) -> dict[str, list]:
    """Ray Data ``map_batches`` function over manifest-stream rows (file, line, sample)."""
    prepared = prepare_rows([(f, s) for f, _, s in samples_of(batch)], spec)
    return {k: [p[k] for p in prepared] for k in prepared[0]} if prepared else {}


def pack(t: torch.Tensor) -> bytes:
    """A tensor as safetensors bytes (dtype and shape travel with it)."""
    return save_tensors({"t": t.contiguous()})


def unpack(blob: bytes) -> torch.Tensor:
    return load_tensors(bytes(blob))["t"]


def collate(batch: dict[str, Sequence], expert_names: Sequence[str], pad_id: int,
            features: str = "cached") -> dict:
    """A batch of prepared rows -> keyword arguments of ``MoVAModel.forward``."""
    n = len(batch["input_ids"])
    padded = pad([{"input_ids": list(batch["input_ids"][i]), "labels": list(batch["labels"][i])}
                  for i in range(n)], pad_id)
    gate = pad([{"input_ids": list(batch["gate_input_ids"][i]),
                 "labels": list(batch["gate_input_ids"][i])} for i in range(n)], 0)
    mask = torch.as_tensor(np.stack([np.asarray(m, bool) for m in batch["expert_mask"]]))
    extra: dict[str, torch.Tensor] = {}
    for j, name in enumerate(expert_names):
        rows = mask[:, j].nonzero().flatten().tolist()
        if not rows:
            continue
        tensors = {i: unpack(batch[f"x_{name}"][i]) for i in rows}
        first = next(iter(tensors.values()))
        full = torch.zeros((n, *first.shape), dtype=first.dtype)
        for i, t in tensors.items():
            full[i] = t
        extra[name] = full
    out = {
        "input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
        "labels": padded["labels"],
        "pixel_values": torch.as_tensor(np.stack(list(batch["pixel_values"]))),
        "gate_input_ids": gate["input_ids"], "gate_attention_mask": gate["attention_mask"],
        "expert_mask": mask,
        "routing_rows": torch.as_tensor(np.asarray(batch["routing"], bool)),
    }
    out["expert_features" if features == "cached" else "expert_inputs"] = extra
    return out

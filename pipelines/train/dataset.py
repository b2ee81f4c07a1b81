"""Ray Datasets that training and evaluation consume: manifest rows joined with the cache.

Each row is one prepared sample: token ids and labels (image placeholder expanded to the
adapter's tokens, or to the routing tokens for routing-instruction rows), the base encoder's
pixels, the gate text's ids, the routing label as a 0/1 mask, and for each routed expert either
its cached native features (``features=cached``) or its prepared input (``features=compute``).
:func:`collate` turns a batch of rows into the tensors ``MoVAModel.forward`` takes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.common import storage
from pipelines.features.cache import FeatureCache

log = logging.getLogger(__name__)

FEATURE_MODES = ("cached", "compute")


@dataclass(frozen=True)
class PrepareSpec:
    """What a data worker needs to prepare rows (picklable, small)."""

    checkpoint: str
    manifest: str
    cache: str | None
    features: str
    max_length: int | None


@functools.lru_cache(maxsize=4)
def _context(checkpoint: str):
    """Tokenizers, template, processor and cache keys of a checkpoint, once per process."""
    from transformers import AutoTokenizer

    from mova.builders import ensure_image_token
    from mova.checkpoint import expert_cache_keys, load_config, read_components
    from mova.conversation import get_template
    from mova.experts.preprocess import ImageProcessor
    from mova.experts.registry import resolve_expert

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
def _cache(root: str) -> FeatureCache:
    return FeatureCache(root)


def prepare_row(row: dict, spec: PrepareSpec) -> dict:
    """One manifest row -> one training row (see the module docstring)."""
    from mova.conversation import gate_text, tokenize_conversation, user_questions
    from mova.images import image_hash, load_image
    from pipelines.data.manifest import resolve_image

    ctx = _context(spec.checkpoint)
    config = ctx["config"]
    routing = row.get("kind") == "routing"
    turns = list(row["conversations"])
    has_image = bool(row.get("image"))
    n_tokens = config.num_routing_tokens if routing else config.num_image_tokens
    enc = tokenize_conversation(turns, ctx["tokenizer"], ctx["template"], n_tokens,
                                has_image=has_image, max_length=spec.max_length)
    gate = ctx["text_tokenizer"](gate_text(user_questions(turns)), truncation=True,
                                 max_length=config.text_encoder.max_length)
    names = config.expert_names
    label = [] if routing or row.get("experts") is None else list(row["experts"])
    out = {
        "id": row["id"], "input_ids": np.asarray(enc["input_ids"], np.int64),
        "labels": np.asarray(enc["labels"], np.int64),
        "gate_input_ids": np.asarray(gate["input_ids"], np.int64),
        "expert_mask": np.asarray([n in label for n in names], np.bool_),
        "routing": routing,
    }
    if not has_image:
        raise ValueError(f"sample {row['id']!r} has no image; text-only samples are not "
                         "supported by training yet")
    image = load_image(storage.read_bytes(resolve_image(spec.manifest, row["image"])))
    out["pixel_values"] = ctx["processor"].base([image])[0].numpy()
    digest = image_hash(image)
    for name in names:
        out[f"x_{name}"] = b""
        if name not in label:
            continue
        if spec.features == "cached":
            try:
                feats = _cache(spec.cache).get(name, ctx["keys"][name], digest)
            except KeyError as exc:
                raise ValueError(f"sample {row['id']!r}: {exc}; run `mova features` for this "
                                 "manifest first, or train with features=compute") from exc
            out[f"x_{name}"] = _pack(feats)
        else:
            out[f"x_{name}"] = _pack(ctx["processor"].expert(name, [image])[0])
    return out


def _pack(t: torch.Tensor) -> bytes:
    """Tensor -> bytes with a tiny header (dtype, shape), for ragged Arrow binary columns."""
    import io

    buf = io.BytesIO()
    dtype = str(t.dtype).removeprefix("torch.")
    header = f"{dtype}|{','.join(map(str, t.shape))}|".encode()
    buf.write(len(header).to_bytes(2, "little"))
    buf.write(header)
    data = t.contiguous()
    buf.write((data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy().tobytes())
    return buf.getvalue()


def _unpack(blob: bytes) -> torch.Tensor:
    n = int.from_bytes(blob[:2], "little")
    dtype, shape, _ = blob[2:2 + n].decode().split("|")
    dims = tuple(int(d) for d in shape.split(",") if d)
    raw = blob[2 + n:]
    if dtype == "bfloat16":
        return torch.from_numpy(np.frombuffer(raw, np.int16).reshape(dims).copy()).view(
            torch.bfloat16)
    return torch.from_numpy(np.frombuffer(raw, np.dtype(dtype)).reshape(dims).copy())


def prepare_batch(batch: dict[str, np.ndarray], spec: PrepareSpec) -> dict[str, list]:
    """Ray Data ``map_batches`` function over manifest rows."""
    keys = list(batch)
    rows = [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    prepared = [prepare_row(_plain(r), spec) for r in rows]
    return {k: [p[k] for p in prepared] for k in prepared[0]} if prepared else {}


def _plain(row: dict) -> dict:
    """Arrow/NumPy values back to plain Python (lists, dicts, None)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    return out


def build_dataset(manifest: str, checkpoint: str, *, cache: str | None = None,
                  features: str = "cached", max_length: int | None = None,
                  skip_bad_rows: bool = False, batch_size: int = 16):
    """The prepared Ray Dataset of a manifest (validated first, before any Ray work) and its
    number of samples."""
    import ray

    from mova.checkpoint import load_config
    from pipelines.data.manifest import load_manifest

    if features not in FEATURE_MODES:
        raise ValueError(f"features={features!r}; expected one of {FEATURE_MODES}")
    if features == "cached" and not cache:
        raise ValueError("features=cached needs the feature cache location (cache=...)")
    config = load_config(checkpoint)
    samples = load_manifest(manifest, pool=config.expert_names, check_images=False,
                            skip_bad_rows=skip_bad_rows)
    spec = PrepareSpec(checkpoint=str(checkpoint), manifest=str(manifest),
                       cache=str(cache) if cache else None, features=features,
                       max_length=max_length)
    rows = [{"id": s.id, "image": s.image, "kind": s.kind, "experts": s.experts,
             "conversations": s.conversations} for s in samples]
    dataset = ray.data.from_items(rows).map_batches(prepare_batch, fn_kwargs={"spec": spec},
                                                    batch_size=batch_size)
    return dataset, len(rows)


def collate(batch: dict[str, Sequence], expert_names: Sequence[str], pad_id: int,
            features: str = "cached") -> dict:
    """A batch of prepared rows -> keyword arguments of ``MoVAModel.forward``."""
    from mova.conversation import collate as pad

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
        tensors = {i: _unpack(batch[f"x_{name}"][i]) for i in rows}
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

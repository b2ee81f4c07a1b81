"""The training data of one worker: its rows of the epoch order, prepared, as a Ray Dataset.

Each prepared row is one sample: token ids and labels (image placeholder expanded to the
adapter's tokens, or to the routing tokens for routing-instruction rows), the base encoder's
pixels, the gate text's ids, the routing label as a 0/1 mask, and for each routed expert either
its cached native features (``features=cached``, fetched from the cache index with ranged
reads) or its prepared input (``features=compute``). :func:`collate` turns a batch of rows into
the tensors ``MoVAModel.forward`` takes.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.common import storage
from pipelines.data.schema import Sample
from pipelines.features.cache import FeatureCache
from pipelines.train.order import EpochOrder, positions_in_window, worker_windows

log = logging.getLogger(__name__)

FEATURE_MODES = ("cached", "compute")


@dataclass(frozen=True)
class PrepareSpec:
    """What a data worker needs to prepare rows (picklable, small)."""

    checkpoint: str  # a local folder on this node
    cache: str | None
    features: str
    max_length: int | None


@functools.lru_cache(maxsize=4)
def _context(checkpoint: str) -> dict[str, Any]:
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
def feature_cache(root: str) -> FeatureCache:
    """One cache object (and so one loaded index per expert) per process."""
    return FeatureCache(root)


def tokenize_sample(sample: Sample, spec: PrepareSpec) -> dict[str, Any]:
    """Everything of a sample but its image: ids, labels, gate ids, the expert mask."""
    from mova.conversation import gate_text, tokenize_conversation, user_questions

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
    from mova.images import image_hash, load_image
    from pipelines.data.manifest import resolve_image

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
    from pipelines.data.stream import samples_of

    prepared = prepare_rows([(f, s) for f, _, s in samples_of(batch)], spec)
    return {k: [p[k] for p in prepared] for k in prepared[0]} if prepared else {}


def pack(t: torch.Tensor) -> bytes:
    """Tensor -> bytes with a tiny header (dtype, shape), for ragged Arrow binary columns."""
    buf = io.BytesIO()
    dtype = str(t.dtype).removeprefix("torch.")
    header = f"{dtype}|{','.join(map(str, t.shape))}|".encode()
    buf.write(len(header).to_bytes(2, "little"))
    buf.write(header)
    data = t.contiguous()
    buf.write((data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy().tobytes())
    return buf.getvalue()


def unpack(blob: bytes) -> torch.Tensor:
    n = int.from_bytes(blob[:2], "little")
    dtype, shape, _ = blob[2:2 + n].decode().split("|")
    dims = tuple(int(d) for d in shape.split(",") if d)
    raw = blob[2 + n:]
    if dtype == "bfloat16":
        return torch.from_numpy(np.frombuffer(raw, np.int16).reshape(dims).copy()).view(
            torch.bfloat16)
    return torch.from_numpy(np.frombuffer(raw, np.dtype(dtype)).reshape(dims).copy())


def window_rows(batch: dict[str, np.ndarray], order: EpochOrder, rank: int,
                pool: list[str], skip_bad_rows: bool) -> dict[str, list]:
    """One window of the epoch order -> this worker's rows of it, in order (no images read)."""
    from pipelines.data.stream import chunk_samples

    files, lines, samples = [], [], []
    for raw in batch["window"]:
        window = json.loads(str(raw))
        rows = [(c["path"], line, s) for c in window["chunk_specs"]
                for line, s in chunk_samples(c, pool, skip_bad_rows)]
        if len(rows) != window["size"]:
            raise RuntimeError(f"the manifest changed since it was scanned: a window holds "
                               f"{len(rows)} valid rows, the scan counted {window['size']}")
        for i in positions_in_window(window, order, rank):
            path, line, sample = rows[i]
            files.append(path)
            lines.append(line)
            samples.append(json.dumps(sample.to_dict(), ensure_ascii=False))
    return {"file": files, "line": lines, "sample": samples}


def worker_dataset(chunks: Sequence[dict], order: EpochOrder, rank: int, start_row: int,
                   spec: PrepareSpec, pool: list[str], *, skip_bad_rows: bool = False,
                   prepare_batch_size: int = 8) -> Any:
    """This worker's prepared rows of one epoch from its row ``start_row`` on, in order."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the point
    windows = worker_windows([c["valid"] for c in chunks], order, rank, start_row)
    for w in windows:
        w["chunk_specs"] = [chunks[c] for c in w["chunks"]]
    if not windows:
        raise ValueError(f"worker {rank} has no rows left in epoch {order.epoch}")
    items = [{"window": json.dumps(w)} for w in windows]
    return (ray.data.from_items(items, override_num_blocks=len(items))
            # one window at a time: parsing a window is cheap next to preparing its rows, and
            # windows read side by side would only delay the first batch on a busy node
            .map_batches(window_rows, batch_size=1,
                         compute=ray.data.TaskPoolStrategy(size=1),
                         fn_kwargs={"order": order, "rank": rank, "pool": pool,
                                    "skip_bad_rows": skip_bad_rows})
            .map_batches(prepare_batch, batch_size=prepare_batch_size,
                         fn_kwargs={"spec": spec}))


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

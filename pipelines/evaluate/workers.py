"""The Ray Data stages of `mova eval` (see :mod:`pipelines.evaluate.job`): manifest rows ->
questions -> predictions (a model actor pool, or HTTP requests to an endpoint) -> prediction
parts written by the workers, and the compact records the driver scores."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mova.checkpoint import llm_folder
from mova.factory import from_pretrained
from mova.images import ImageError, load_image
from mova.routing_constraint import use_constrained_routing
from mova.typed_dict import from_dict
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.llm_engine import LLMEngineRecipe
from pipelines.common.manifests.parts import write_jsonl_part
from pipelines.common.manifests.stream import samples_of
from pipelines.evaluate.http import predict_http
from pipelines.evaluate.items import EvalItem, item_of
from pipelines.evaluate.report import build_records
from pipelines.evaluate.scoring import YES_NO_BENCHMARKS

COMPACT_META = ("benchmark", "label", "category", "image_id")


def to_items(batch: dict[str, np.ndarray], benchmark: str, metric: str | None, routing: str,
             pool: list[str] | None, forced: list[str]) -> dict[str, list]:
    """Manifest rows -> the questions to ask (routing-instruction rows dropped)."""
    out: dict[str, list] = {"item": [], "experts": []}
    for file, _, sample in samples_of(batch):
        item = item_of(sample, file, benchmark, metric, routing, pool)
        if item is None:
            continue
        out["item"].append(json.dumps(asdict(item), ensure_ascii=False))
        experts = (list(forced) if routing == "forced" else
                   list(item.experts or []) if routing == "label" else None)
        out["experts"].append(json.dumps(experts))
    return out


def _failed(message: str) -> dict[str, Any]:
    return {"prediction": "", "experts": None, "routing_reply": None, "forced": False,
            "error": message}


def predict_batch(model: Any, images: Sequence[str], turns: Sequence[list[dict]],
                  experts: Sequence[list[str] | None], max_new_tokens: int
                  ) -> list[dict[str, Any]]:
    """Greedy answers for one batch; an unreadable image (or a question the model refuses,
    e.g. too long) becomes an error result instead of failing the batch."""
    out: list[dict[str, Any] | None] = [None] * len(images)
    pil: dict[int, Any] = {}
    for i, uri in enumerate(images):
        try:
            pil[i] = load_image(storage.read_bytes(uri))
        except (ImageError, OSError, ValueError) as exc:
            out[i] = _failed(f"image {uri}: {exc}")

    def run(rows: list[int]) -> None:
        forced = None if experts[rows[0]] is None else [list(experts[i]) for i in rows]
        results = model.generate([pil[i] for i in rows], [turns[i] for i in rows],
                                 experts=forced, max_new_tokens=max_new_tokens,
                                 do_sample=False)
        for i, r in zip(rows, results, strict=True):
            out[i] = {"prediction": r.answer, "experts": list(r.experts),
                      "routing_reply": r.routing_reply, "forced": forced is not None,
                      "error": None}

    good = [i for i in range(len(images)) if out[i] is None]
    if good:
        try:
            run(good)
        except ValueError:
            for i in good:  # find the question(s) at fault
                try:
                    run([i])
                except ValueError as exc:
                    out[i] = _failed(f"model: {exc}")
    return [r if r is not None else _failed("not run") for r in out]


def _items(batch: dict[str, np.ndarray]) -> list[EvalItem]:
    return [EvalItem(**json.loads(str(raw))) for raw in batch["item"]]


def load_eval_model(checkpoint: str, llm: LLMEngineRecipe, max_rows: int) -> Any:
    """The model an eval actor runs: whole, decoding with the torch loop; or, on vLLM, without
    the LLM's weights (vLLM reads the checkpoint's ``llm/`` folder itself) and with a
    :class:`pipelines.evaluate.vllm_decode.VLLMDecode` as its ``decode_backend``."""
    root = local_checkpoint(checkpoint)
    if llm.resolved_engine() == "torch":
        return from_pretrained(root, device="auto")
    from pipelines.evaluate.vllm_decode import VLLMDecode

    model = from_pretrained(root, device="auto", skip=["llm"])
    folder = str(llm_folder(root))
    model.decode_backend = VLLMDecode(folder, model.tokenizer, model.eos_ids(),
                                      model.image_token_id, llm.vllm, max_rows)
    return model


class EvalWorker:
    """Ray Data actor: the model loaded once, greedy batched generation per batch; ``llm``:
    the recipe's ``llm`` section (which engine decodes), as a mapping."""

    def __init__(self, checkpoint: str, max_new_tokens: int,
                 constrained_routing: bool = True, llm: dict[str, Any] | None = None,
                 batch_size: int = 8) -> None:
        engine = from_dict(LLMEngineRecipe, llm or {})
        # routes as `mova serve` does (its recipe's constrained_routing, on by default)
        self.model = use_constrained_routing(load_eval_model(checkpoint, engine, batch_size),
                                             constrained_routing)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = _items(batch)
        results = predict_batch(self.model, [it.image for it in items],
                                [it.turns for it in items],
                                [json.loads(str(e)) for e in batch["experts"]],
                                self.max_new_tokens)
        return {"item": list(batch["item"]), "result": [json.dumps(r) for r in results]}


@dataclass(frozen=True)
class EndpointSpec:
    """How the HTTP tasks reach a running server."""

    endpoint: str
    model: str
    api_key: str | None
    concurrency: int
    max_new_tokens: int
    timeout_s: float
    max_retries: int


def ask_batch(batch: dict[str, np.ndarray], spec: EndpointSpec) -> dict[str, list]:
    """Ray Data task: ask a running endpoint every question of the batch (bounded pool)."""
    items = _items(batch)
    results = predict_http(
        spec.endpoint,
        [{"image": it.image, "turns": it.turns, "experts": json.loads(str(e))}
         for it, e in zip(items, batch["experts"], strict=True)],
        model=spec.model, api_key=spec.api_key, concurrency=spec.concurrency,
        max_new_tokens=spec.max_new_tokens, timeout_s=spec.timeout_s,
        max_retries=spec.max_retries)
    return {"item": list(batch["item"]), "result": [json.dumps(r) for r in results]}


def write_predictions(batch: dict[str, np.ndarray], folder: str, on_error: str,
                      benchmarks: list[str]) -> dict[str, list]:
    """Write one part of ``predictions/`` and return, per question, the compact record the
    driver needs for the scores and the routing table."""
    items = _items(batch)
    records = build_records(items, [json.loads(str(r)) for r in batch["result"]], on_error)
    name = f"part-{benchmarks.index(items[0].benchmark):03d}-{uuid.uuid4().hex}.jsonl"
    write_jsonl_part(folder, name, records)
    compact = []
    for record, result in zip(records, batch["result"], strict=True):
        meta = record.get("meta") or {}
        yes_no = meta.get("benchmark") in YES_NO_BENCHMARKS
        compact.append(json.dumps({
            "benchmark": record["benchmark"], "id": record["id"], "domain": record["domain"],
            "metric": record["metric"], "score": record["score"], "error": record["error"],
            "experts": record["experts"], "pool": json.loads(str(result)).get("pool"),
            "meta": {k: meta[k] for k in COMPACT_META if k in meta},
            "prediction": record["prediction"] if yes_no else "",
            "answers": record["answers"][:1] if yes_no else []}))
    return {"record": compact, "part": [name] * len(compact)}


def decode_record(raw: Any) -> dict[str, Any]:
    return json.loads(str(raw))

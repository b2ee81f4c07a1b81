"""`mova eval`: score a MoVA model on benchmark files, with Ray Data or over HTTP.

Benchmark files are manifests (`mova data convert <benchmark>` and `mova data synth` write
them): per row an image, the conversation whose last human turn is the prompt (the
``<image>`` placeholder and the benchmark's prompt suffix included), the reference ``answers``
(else the final gpt turn), the per-sample ``metric`` (else the recipe entry's ``metric``),
``domain`` and ``meta`` (POPE/MME rows carry ``benchmark``, ``label``, ``category``,
``image_id``) and ``experts`` (the routing label, used with ``routing: label``).
Routing-instruction rows (``kind: routing``) are skipped.

Flow: read and check the recipe, the checkpoint and every benchmark file on the driver (before
Ray starts) -> batch inference: a Ray Data actor pool (the model loaded once per actor) running
greedy batched ``MoVAModel.generate``, or a bounded pool of HTTP requests to a running endpoint
-> per-sample scores, per-benchmark scores (:mod:`pipelines.evaluate.scoring`) and the routing
activation table -> ``predictions.jsonl``, ``scores.json`` and ``report.md`` in the output
folder -> the same, with params and metrics, in an MLflow run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.common import storage
from pipelines.common.ray_init import actor_pool_args
from pipelines.evaluate.items import EvalItem, load_items, routing_for
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.evaluate.report import (
    PREDICTIONS,
    REPORT,
    SCORES,
    EvalSummary,
    build_records,
    log_mlflow,
    report_markdown,
)
from pipelines.evaluate.scoring import activation_table, score_all

log = logging.getLogger(__name__)


def _failed(message: str) -> dict[str, Any]:
    return {"prediction": "", "experts": None, "routing_reply": None, "forced": False,
            "error": message}


def predict_batch(model: Any, images: Sequence[str], turns: Sequence[list[dict]],
                  experts: Sequence[list[str] | None], max_new_tokens: int
                  ) -> list[dict[str, Any]]:
    """Greedy answers for one batch; an unreadable image (or a question the model refuses,
    e.g. too long) becomes an error result instead of failing the batch."""
    from mova.images import ImageError, load_image

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


class EvalWorker:
    """Ray Data actor: the model loaded once, greedy batched generation per batch."""

    def __init__(self, checkpoint: str, max_new_tokens: int, use_gpu: bool) -> None:
        import torch

        from mova.factory import from_pretrained

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = from_pretrained(checkpoint, device=device)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = predict_batch(self.model, [str(u) for u in batch["image"]],
                                [json.loads(str(t)) for t in batch["turns"]],
                                [json.loads(str(e)) for e in batch["experts"]],
                                self.max_new_tokens)
        return {"key": [int(k) for k in batch["key"]],
                "result": [json.dumps(r) for r in results]}


def _predict_ray(recipe: EvalRecipe, items: list[EvalItem]) -> list[dict[str, Any]]:
    import ray

    recipe.start_ray()
    rows = [{"key": k, "image": it.image, "turns": json.dumps(it.turns),
             "experts": json.dumps(routing_for(it, recipe))} for k, it in enumerate(items)]
    out = (
        ray.data.from_items(rows)
        .map_batches(
            EvalWorker,
            fn_constructor_kwargs={"checkpoint": recipe.checkpoint,
                                   "max_new_tokens": recipe.max_new_tokens,
                                   "use_gpu": recipe.gpus_per_worker > 0},
            batch_size=recipe.batch_size,
            **actor_pool_args(recipe.workers, recipe.cpus_per_worker,
                              recipe.gpus_per_worker),
        )
        .take_all()
    )
    by_key = {int(r["key"]): json.loads(r["result"]) for r in out}
    missing = [k for k in range(len(items)) if k not in by_key]
    if missing:
        raise RuntimeError(f"batch inference returned no result for {len(missing)} "
                           f"question(s), e.g. {items[missing[0]].benchmark}/"
                           f"{items[missing[0]].id}")
    return [by_key[k] for k in range(len(items))]


def _predict_http(recipe: EvalRecipe, items: list[EvalItem], api_key: str | None
                  ) -> list[dict[str, Any]]:
    from pipelines.evaluate.http import predict_http

    assert recipe.endpoint is not None
    return predict_http(
        recipe.endpoint,
        [{"image": it.image, "turns": it.turns, "experts": routing_for(it, recipe)}
         for it in items],
        model=recipe.model_name, api_key=api_key, concurrency=recipe.concurrency,
        max_new_tokens=recipe.max_new_tokens, timeout_s=recipe.request_timeout_s,
        max_retries=recipe.max_retries)


def check_inputs(recipe: EvalRecipe) -> tuple[list[EvalItem], list[str] | None]:
    """Checkpoint, forced experts and every benchmark file, before any Ray or HTTP work."""
    pool: list[str] | None = None
    if recipe.checkpoint:
        from mova.checkpoint import load_config, read_components

        if storage.is_remote(recipe.checkpoint):
            raise ValueError(f"checkpoint {recipe.checkpoint}: evaluation loads checkpoints "
                             "from a local (or shared) folder; copy it there first")
        read_components(recipe.checkpoint)
        pool = load_config(recipe.checkpoint).expert_names
        unknown = [e for e in recipe.experts if e not in pool]
        if unknown:
            raise ValueError(f"eval recipe: experts {unknown} are not in the checkpoint's pool "
                             f"{pool}")
    items: list[EvalItem] = []
    for spec in recipe.benchmarks:
        items += load_items(spec, recipe.routing, pool)
    return items, pool


def run_eval(recipe: EvalRecipe) -> EvalSummary:
    """Evaluate the recipe's checkpoint (Ray Data) or endpoint (HTTP) on its benchmarks."""
    start = time.perf_counter()
    recipe = recipe.absolute().validate()
    items, pool = check_inputs(recipe)
    log.info("%d questions from %d benchmark(s)", len(items), len(recipe.benchmarks))
    if recipe.checkpoint:
        mode, source = "checkpoint", recipe.checkpoint
        results = _predict_ray(recipe, items)
    else:
        from pipelines.evaluate.http import check_endpoint, resolve_api_key

        mode, source = "endpoint", str(recipe.endpoint)
        api_key = resolve_api_key(recipe.api_key, recipe.api_key_env)
        check_endpoint(source, api_key)
        results = _predict_http(recipe, items, api_key)
        pool = next((list(r["pool"]) for r in results if r.get("pool")), None)
    records = build_records(items, results, recipe.on_error)
    summary = _summarize(recipe, records, pool, mode, source)
    files = _write_files(recipe, summary, records)
    log_mlflow(recipe, summary, files)
    summary.seconds = time.perf_counter() - start
    log.info("evaluation done in %.1f s: %s", summary.seconds, ", ".join(
        f"{k} {v.headline} {v.score:.4g}" for k, v in summary.scores.items()))
    return summary


def _summarize(recipe: EvalRecipe, records: list[dict[str, Any]], pool: list[str] | None,
               mode: str, source: str) -> EvalSummary:
    """Scores and the activation table; failed questions reported (or fatal with
    ``on_error=fail``)."""
    failed = [r for r in records if r["error"]]
    examples = [f"{r['benchmark']}/{r['id']}: {r['error']}" for r in failed[:5]]
    if failed and recipe.on_error == "fail":
        raise RuntimeError(f"{len(failed)} question(s) failed (on_error=fail):\n  "
                           + "\n  ".join(examples))
    if failed:
        log.warning("%d question(s) failed (on_error=%s); e.g. %s", len(failed),
                    recipe.on_error, examples[0])
    if pool is None:  # an endpoint that does not report its pool
        pool = sorted({e for r in records for e in (r["experts"] or [])})
    return EvalSummary(
        scores=score_all(records, "skip" if recipe.on_error == "skip" else "empty"),
        activation=activation_table(records, pool), pool=list(pool),
        predictions=storage.join(recipe.output, PREDICTIONS),
        scores_path=storage.join(recipe.output, SCORES),
        report=storage.join(recipe.output, REPORT), questions=len(records), errors=len(failed),
        mode=mode, source=source, error_examples=examples)


def _write_files(recipe: EvalRecipe, summary: EvalSummary,
                 records: list[dict[str, Any]]) -> dict[str, str]:
    """predictions.jsonl, scores.json and report.md in the output folder; returns them."""
    files = {
        PREDICTIONS: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
        SCORES: json.dumps({"scores": {k: v.to_dict() for k, v in summary.scores.items()},
                            "activation": summary.activation, "pool": summary.pool,
                            "questions": summary.questions, "errors": summary.errors,
                            "mode": summary.mode, "source": summary.source,
                            "routing": recipe.routing}, indent=2) + "\n",
        REPORT: report_markdown(summary, recipe),
    }
    for name, text in files.items():
        storage.write_text_atomic(storage.join(recipe.output, name), text)
    return files

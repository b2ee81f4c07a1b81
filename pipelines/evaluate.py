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
-> per-sample scores, per-benchmark scores (:mod:`pipelines.eval_scoring`) and the routing
activation table -> ``predictions.jsonl``, ``scores.json`` and ``report.md`` in the output
folder -> the same, with params and metrics, in an MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mova.tokenizers import IMAGE_TOKEN
from pipelines import storage
from pipelines.eval_recipe import BenchmarkSpec, EvalRecipe
from pipelines.eval_scoring import (
    BenchmarkScore,
    activation_markdown,
    activation_table,
    sample_score,
    score_all,
    scores_markdown,
)
from pipelines.recipes import load_recipe

log = logging.getLogger(__name__)

PREDICTIONS, SCORES, REPORT = "predictions.jsonl", "scores.json", "report.md"
_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-./ :]")


@dataclass
class EvalItem:
    """One question to ask: where it comes from, what to send and what to compare with."""

    benchmark: str
    id: str
    image: str  # resolved path or URI
    turns: list[dict[str, str]]  # ending with the human turn to answer
    answers: list[str]
    metric: str
    domain: str | None = None
    experts: list[str] | None = None  # the row's routing label
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return re.sub(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*", " ",
                      self.turns[-1]["value"]).strip()


@dataclass
class EvalSummary:
    """What `mova eval` produced; ``scores`` and ``activation`` are keyed by benchmark."""

    scores: dict[str, BenchmarkScore]
    activation: dict[str, dict[str, float]]
    pool: list[str]
    predictions: str
    scores_path: str
    report: str
    questions: int
    errors: int
    mode: str
    source: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["scores"] = {k: v.to_dict() for k, v in self.scores.items()}
        return data

    def tables(self) -> str:
        return (f"Scores (fractions in %):\n{scores_markdown(self.scores)}\n"
                f"Routing activation rate per expert (%):\n"
                f"{activation_markdown(self.activation, self.pool)}")

    def format(self) -> str:
        lines = [self.tables(),
                 f"{self.questions} questions ({self.errors} failed) in {self.seconds:.1f} s; "
                 f"{self.mode}: {self.source}"]
        lines += [f"  failed: {e}" for e in self.error_examples]
        lines += [f"Predictions: {self.predictions}", f"Scores:      {self.scores_path}",
                  f"Report:      {self.report}"]
        if self.mlflow_run_id:
            lines.append(f"MLflow run:  {self.mlflow_run_id} at {self.tracking_uri}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading benchmark files
# ---------------------------------------------------------------------------------------------


def load_items(spec: BenchmarkSpec, routing: str = "model",
               pool: Sequence[str] | None = None) -> list[EvalItem]:
    """The questions of one benchmark file, checked; errors name the file and the row."""
    from mova.experts.registry import expert_names
    from pipelines.data.manifest import load_manifest, resolve_image

    if not storage.exists(spec.path):
        raise FileNotFoundError(f"benchmark {spec.name!r}: file not found: {spec.path}")
    samples = load_manifest(spec.path, pool=expert_names(), check_images=False)
    items: list[EvalItem] = []
    skipped = 0
    for sample in samples:
        if sample.kind == "routing":
            skipped += 1
            continue
        if spec.limit is not None and len(items) >= spec.limit:
            break
        where = f"benchmark {spec.name!r} ({spec.path}) row {sample.id!r}"
        if not sample.image:
            raise ValueError(f"{where}: no image; a MoVA question needs one")
        last = max(i for i, t in enumerate(sample.conversations) if t["from"] == "human")
        answers = sample.answers
        if not answers:
            tail = sample.conversations[last + 1:]
            if not tail or not tail[0]["value"].strip():
                raise ValueError(f"{where}: no reference answers (answers is empty and no gpt "
                                 "turn follows the last question)")
            answers = [tail[0]["value"]]
        metric = sample.metric or spec.metric
        if metric is None:
            raise ValueError(f"{where}: no metric; set the row's metric or the benchmark "
                             "entry's metric")
        if routing == "label":
            if sample.experts is None:
                raise ValueError(f"{where}: routing=label needs a routing label (experts) on "
                                 "every row")
            unknown = [e for e in sample.experts if pool is not None and e not in pool]
            if unknown:
                raise ValueError(f"{where}: routing label {unknown} is not in the model's pool "
                                 f"{list(pool or [])}")
        items.append(EvalItem(
            benchmark=spec.name, id=sample.id, image=_norm(resolve_image(spec.path, sample.image)),
            turns=[dict(t) for t in sample.conversations[:last + 1]], answers=list(answers),
            metric=metric, domain=sample.domain,
            experts=list(sample.experts) if sample.experts is not None else None,
            meta=dict(sample.meta or {})))
    if skipped:
        log.info("benchmark %s: skipped %d routing-instruction row(s)", spec.name, skipped)
    if not items:
        raise ValueError(f"benchmark {spec.name!r}: {spec.path} holds no questions")
    return items


def _norm(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.normpath(uri)


def _routing_for(item: EvalItem, recipe: EvalRecipe) -> list[str] | None:
    if recipe.routing == "forced":
        return list(recipe.experts)
    if recipe.routing == "label":
        return list(item.experts or [])
    return None


# ---------------------------------------------------------------------------------------------
# Batch inference
# ---------------------------------------------------------------------------------------------


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

        from mova.checkpoint import from_pretrained

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

    from pipelines.ray_utils import init_ray

    init_ray(recipe.ray.address, num_cpus=recipe.ray.num_cpus,
             object_store_memory=recipe.ray.object_store_memory, temp_dir=recipe.ray.temp_dir)
    rows = [{"key": k, "image": it.image, "turns": json.dumps(it.turns),
             "experts": json.dumps(_routing_for(it, recipe))} for k, it in enumerate(items)]
    out = (
        ray.data.from_items(rows)
        .map_batches(
            EvalWorker,
            fn_constructor_kwargs={"checkpoint": recipe.checkpoint,
                                   "max_new_tokens": recipe.max_new_tokens,
                                   "use_gpu": recipe.gpus_per_worker > 0},
            batch_size=recipe.batch_size,
            compute=ray.data.ActorPoolStrategy(size=recipe.workers),
            num_cpus=recipe.cpus_per_worker,
            num_gpus=recipe.gpus_per_worker or None,
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
    from pipelines.eval_http import predict_http

    assert recipe.endpoint is not None
    return predict_http(
        recipe.endpoint,
        [{"image": it.image, "turns": it.turns, "experts": _routing_for(it, recipe)}
         for it in items],
        model=recipe.model_name, api_key=api_key, concurrency=recipe.concurrency,
        max_new_tokens=recipe.max_new_tokens, timeout_s=recipe.request_timeout_s,
        max_retries=recipe.max_retries)


# ---------------------------------------------------------------------------------------------
# Records, outputs, MLflow
# ---------------------------------------------------------------------------------------------


def build_records(items: Sequence[EvalItem], results: Sequence[dict[str, Any]],
                  on_error: str) -> list[dict[str, Any]]:
    """Prediction records (one per question, in input order) with their per-sample score."""
    records = []
    for item, res in zip(items, results, strict=True):
        record = {
            "benchmark": item.benchmark, "id": item.id, "domain": item.domain,
            "image": item.image, "question": item.question,
            "prediction": res.get("prediction") or "", "answers": item.answers,
            "metric": item.metric, "score": None, "experts": res.get("experts"),
            "routing_reply": res.get("routing_reply"), "forced": bool(res.get("forced")),
            "error": res.get("error"), "meta": item.meta,
        }
        record["score"] = sample_score(record, "skip" if on_error == "skip" else "empty")
        records.append(record)
    return records


def _metric_key(key: str) -> str:
    return _METRIC_KEY.sub("_", key)


def _log_mlflow(recipe: EvalRecipe, summary: EvalSummary, files: dict[str, str]) -> None:
    from pipelines.tracking import Tracker, flatten, resolve_tracking_uri

    output = recipe.output
    root = storage.parent(output) if not storage.is_remote(output) else str(
        Path("outputs").resolve())
    tracking_uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, root)
    source = Path(recipe.checkpoint).name if recipe.checkpoint else (recipe.endpoint or "")
    run_name = recipe.mlflow.run_name or f"eval-{source}"
    tracker = Tracker(tracking_uri, recipe.mlflow.experiment, storage.join(root, "mlartifacts"),
                      run_name, system_metrics=recipe.mlflow.system_metrics)
    try:
        params = dataclasses.asdict(recipe)
        params.pop("benchmarks")
        if params.get("api_key"):
            params["api_key"] = "***"
        flat = flatten(params)
        for spec in recipe.benchmarks:
            flat[f"benchmarks.{spec.name}.path"] = spec.path
            flat[f"benchmarks.{spec.name}.limit"] = str(spec.limit)
        flat.update(mode=summary.mode, questions=str(summary.questions))
        tracker.log_params(flat)
        tracker.client.set_tag(tracker.run_id, "mova.job", "eval")
        metrics: dict[str, float] = {"questions": summary.questions, "errors": summary.errors}
        for name, s in summary.scores.items():
            metrics[f"{name}/score"] = s.score
            metrics[f"{name}/questions"] = s.questions
            metrics[f"{name}/errors"] = s.errors
            for key, value in s.details.items():
                metrics[f"{name}/{key}"] = value
        for row, rates in summary.activation.items():
            for expert, rate in rates.items():
                metrics[f"activation/{row}/{expert}"] = rate
        tracker.log_metrics({_metric_key(k): float(v) for k, v in metrics.items()}, step=0)
        for name, text in files.items():
            tracker.log_text(text, f"eval/{name}")
        tracker.end()
    except BaseException:
        tracker.end("FAILED")
        raise
    summary.mlflow_run_id, summary.tracking_uri = tracker.run_id, tracking_uri


def _report(summary: EvalSummary, recipe: EvalRecipe) -> str:
    routing = recipe.routing + (f" {recipe.experts}" if recipe.routing == "forced" else "")
    return (f"# MoVA evaluation\n\n{summary.mode}: {summary.source}  \nrouting: {routing}  \n"
            f"max_new_tokens: {recipe.max_new_tokens}  \nquestions: {summary.questions} "
            f"({summary.errors} failed, on_error={recipe.on_error})\n\n"
            f"## Scores (fractions in %)\n\n{scores_markdown(summary.scores)}\n"
            f"## Routing activation rate per expert (%)\n\n"
            f"{activation_markdown(summary.activation, summary.pool)}")


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


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
    recipe = dataclasses.replace(
        recipe, checkpoint=_abs(recipe.checkpoint), output=_abs(recipe.output),
        benchmarks=[dataclasses.replace(b, path=_abs(b.path)) for b in recipe.benchmarks])
    recipe.validate()
    items, pool = check_inputs(recipe)
    log.info("%d questions from %d benchmark(s)", len(items), len(recipe.benchmarks))
    if recipe.checkpoint:
        mode, source = "checkpoint", recipe.checkpoint
        results = _predict_ray(recipe, items)
    else:
        from pipelines.eval_http import check_endpoint, resolve_api_key

        mode, source = "endpoint", str(recipe.endpoint)
        api_key = resolve_api_key(recipe.api_key, recipe.api_key_env)
        check_endpoint(source, api_key)
        results = _predict_http(recipe, items, api_key)
        pool = next((list(r["pool"]) for r in results if r.get("pool")), None)
    records = build_records(items, results, recipe.on_error)
    failed = [r for r in records if r["error"]]
    examples = [f"{r['benchmark']}/{r['id']}: {r['error']}" for r in failed[:5]]
    if failed and recipe.on_error == "fail":
        raise RuntimeError(f"{len(failed)} question(s) failed (on_error=fail):\n  "
                           + "\n  ".join(examples))
    if pool is None:  # an endpoint that does not report its pool
        pool = sorted({e for r in records for e in (r["experts"] or [])})
    scores = score_all(records, "skip" if recipe.on_error == "skip" else "empty")
    summary = EvalSummary(
        scores=scores, activation=activation_table(records, pool), pool=list(pool),
        predictions=storage.join(recipe.output, PREDICTIONS),
        scores_path=storage.join(recipe.output, SCORES),
        report=storage.join(recipe.output, REPORT), questions=len(records), errors=len(failed),
        mode=mode, source=source, error_examples=examples)
    if failed:
        log.warning("%d question(s) failed (on_error=%s); e.g. %s", len(failed),
                    recipe.on_error, examples[0])
    files = {
        PREDICTIONS: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
        SCORES: json.dumps({"scores": {k: v.to_dict() for k, v in scores.items()},
                            "activation": summary.activation, "pool": summary.pool,
                            "questions": summary.questions, "errors": summary.errors,
                            "mode": mode, "source": source, "routing": recipe.routing},
                           indent=2) + "\n",
        REPORT: _report(summary, recipe),
    }
    for name, text in files.items():
        storage.write_text_atomic(storage.join(recipe.output, name), text)
    _log_mlflow(recipe, summary, files)
    summary.seconds = time.perf_counter() - start
    log.info("evaluation done in %.1f s: %s", summary.seconds, ", ".join(
        f"{k} {v.headline} {v.score:.4g}" for k, v in scores.items()))
    return summary


def _abs(path: str) -> str:
    return path if not path or storage.is_remote(path) else os.path.abspath(path)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(EvalRecipe, args.config, args.overrides)
    summary = run_eval(recipe)
    print(summary.format())
    if args.json:
        storage.write_text_atomic(args.json, json.dumps(summary.to_dict(), indent=2) + "\n")
        print(f"Summary written to {args.json}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (Ray Data) or an endpoint (HTTP) on "
                       "benchmark files", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (jobs/eval.yaml)")
    p.add_argument("--json", help="also write the summary as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.set_defaults(func=run)

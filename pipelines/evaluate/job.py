"""`mova eval`: score a MoVA model on benchmark files, with Ray Data or over HTTP.

Benchmark files are manifests (`mova data convert <benchmark>` and `mova data synth` write
them): per row an image, the conversation whose last human turn is the prompt (the
``<image>`` placeholder and the benchmark's prompt suffix included), the reference ``answers``
(else the final gpt turn), the per-sample ``metric`` (else the recipe entry's ``metric``),
``domain`` and ``meta`` (POPE/MME rows carry ``benchmark``, ``label``, ``category``,
``image_id``) and ``experts`` (the routing label, used with ``routing: label``).
Routing-instruction rows (``kind: routing``) are skipped.

Flow: check the recipe, the checkpoint (or endpoint) and scan every benchmark file (Ray tasks;
a bad row is named before any inference) -> one streaming dataset: rows -> questions ->
predictions from a Ray Data actor pool (the model loaded once per actor, greedy batched
``MoVAModel.generate``) or from Ray tasks asking a running endpoint over HTTP -> workers write
``predictions/`` in parts and hand the driver one compact record per question -> the driver adds
up per-benchmark scores (:mod:`pipelines.evaluate.scoring`) and the routing activation table ->
``scores.json`` and ``report.md`` -> the same, with params and metrics, in an MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from mova.checkpoint import load_config, read_components
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.manifests.parts import begin_parts, publish_parts
from pipelines.common.manifests.scan import ManifestScan, scan_manifest
from pipelines.common.manifests.stream import manifest_dataset
from pipelines.common.resources import actor_pool_args, model_actor_memory
from pipelines.evaluate.http import check_endpoint, resolve_api_key
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.evaluate.report import (
    PREDICTIONS,
    REPORT,
    SCORES,
    EvalSummary,
    log_mlflow,
    report_markdown,
)
from pipelines.evaluate.scoring import ActivationBoard, BenchmarkBoard
from pipelines.evaluate.workers import (
    EndpointSpec,
    EvalWorker,
    ask_batch,
    to_items,
    write_predictions,
)

log = logging.getLogger(__name__)
PART_ROWS = 256  # predictions per written part


def check_inputs(recipe: EvalRecipe) -> list[str] | None:
    """The checkpoint (its pool) and forced experts, before any Ray or HTTP work."""
    if not recipe.checkpoint:
        return None

    local = local_checkpoint(recipe.checkpoint, parts=["meta"])
    read_components(local)
    pool = load_config(local).expert_names
    unknown = [e for e in recipe.experts if e not in pool]
    if unknown:
        raise ValueError(f"eval recipe: experts {unknown} are not in the checkpoint's pool "
                         f"{pool}")
    return pool


def run_eval(recipe: EvalRecipe) -> EvalSummary:
    """Evaluate the recipe's checkpoint (Ray Data) or endpoint (HTTP) on its benchmarks."""
    start = time.perf_counter()
    recipe = recipe.absolute().validate()
    for spec in recipe.benchmarks:
        if not storage.exists(spec.path):
            raise FileNotFoundError(f"benchmark {spec.name!r}: file not found: {spec.path}")
    pool = check_inputs(recipe)
    api_key = None
    if recipe.endpoint:
        api_key = resolve_api_key(recipe.api_key, recipe.api_key_env)
        check_endpoint(recipe.endpoint, api_key)
    recipe.start_ray()
    scans = {spec.name: _limit(scan_manifest(spec.path), spec.limit)
             for spec in recipe.benchmarks}
    for scan in scans.values():
        scan.require_ok(False)
    questions = sum(min(s.valid, b.limit or s.valid) for s, b in
                    zip(scans.values(), recipe.benchmarks, strict=True))
    log.info("%d questions from %d benchmark(s)", questions, len(recipe.benchmarks))
    folder = storage.join(recipe.output, PREDICTIONS)
    if storage.exists(folder):
        storage.delete(folder)
    begin_parts(folder, "mova eval")
    boards = {spec.name: BenchmarkBoard(spec.name, _policy(recipe))
              for spec in recipe.benchmarks}
    activation, parts, failed, seen_pool = ActivationBoard(), set(), [], None
    for batch in _pipeline(recipe, scans, pool, api_key, folder).iter_batches(
            batch_size=256, batch_format="numpy"):
        parts.update(str(p) for p in batch["part"])
        for raw in batch["record"]:
            record = json.loads(str(raw))
            boards[record["benchmark"]].add(record)
            activation.add(record)
            seen_pool = seen_pool or record.get("pool")
            if record["error"] and len(failed) < 5:
                failed.append(f"{record['benchmark']}/{record['id']}: {record['error']}")
    publish_parts(folder, sorted(parts), sum(b.questions for b in boards.values()))
    summary = _summarize(recipe, boards, activation, pool or seen_pool, failed)
    files = _write_files(recipe, summary)
    log_mlflow(recipe, summary, files)
    summary.seconds = time.perf_counter() - start
    log.info("evaluation done in %.1f s: %s", summary.seconds, ", ".join(
        f"{k} {v.headline} {v.score:.4g}" for k, v in summary.scores.items()))
    return summary


def _actor_memory(recipe: EvalRecipe) -> int:
    """An eval actor's memory: the model and a batch, plus vLLM's KV cache when it decodes
    (on CPU nodes the cache is host memory)."""
    memory = model_actor_memory(recipe.checkpoint, recipe.batch_size)
    if recipe.llm.resolved_engine() == "vllm" and recipe.gpus_per_worker == 0:
        memory += recipe.llm.vllm.kv_cache_gib * 2**30
    return memory


def _policy(recipe: EvalRecipe) -> str:
    return "skip" if recipe.on_error == "skip" else "empty"


def _limit(scan: ManifestScan, limit: int | None) -> ManifestScan:
    """The scan cut to the chunks holding the first ``limit`` valid rows."""
    if limit is None or scan.valid <= limit:
        return scan
    kept, total = [], 0
    for chunk in scan.chunks:
        if total >= limit:
            break
        kept.append(chunk)
        total += chunk.valid
    scan.chunks, scan.valid, scan.row_limit = kept, total, limit
    return scan


def _pipeline(recipe: EvalRecipe, scans: dict[str, ManifestScan], pool: list[str] | None,
              api_key: str | None, folder: str) -> Any:
    """Rows of every benchmark -> questions -> predictions -> written parts + compact records."""
    names = [spec.name for spec in recipe.benchmarks]
    streams = []
    for spec in recipe.benchmarks:
        scan = scans[spec.name]
        streams.append(manifest_dataset(scan)
                       .map_batches(to_items, batch_size=256,
                                    fn_kwargs={"benchmark": spec.name, "metric": spec.metric,
                                               "routing": recipe.routing, "pool": pool,
                                               "forced": list(recipe.experts)}))
    ds = streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
    if recipe.checkpoint:
        ds = ds.map_batches(EvalWorker, batch_size=recipe.batch_size,
                            fn_constructor_kwargs={
                                "checkpoint": recipe.checkpoint,
                                "max_new_tokens": recipe.max_new_tokens,
                                "constrained_routing": recipe.constrained_routing,
                                "llm": dataclasses.asdict(recipe.llm),
                                "batch_size": recipe.batch_size},
                            **actor_pool_args(recipe.workers, recipe.cpus_per_worker,
                                              recipe.gpus_per_worker, _actor_memory(recipe)))
    else:
        assert recipe.endpoint is not None
        spec = EndpointSpec(endpoint=recipe.endpoint, model=recipe.model_name, api_key=api_key,
                            concurrency=recipe.concurrency,
                            max_new_tokens=recipe.max_new_tokens,
                            timeout_s=recipe.request_timeout_s, max_retries=recipe.max_retries)
        ds = ds.map_batches(ask_batch, batch_size=max(recipe.concurrency, recipe.batch_size),
                            fn_kwargs={"spec": spec}, num_cpus=0.25)
    return ds.map_batches(write_predictions, batch_size=PART_ROWS,
                          fn_kwargs={"folder": folder, "on_error": _policy(recipe),
                                     "benchmarks": names})


def _summarize(recipe: EvalRecipe, boards: dict[str, BenchmarkBoard],
               activation: ActivationBoard, pool: list[str] | None,
               failed: list[str]) -> EvalSummary:
    """Scores and the activation table; failed questions reported (or fatal with
    ``on_error=fail``)."""
    errors = sum(b.errors for b in boards.values())
    if errors and recipe.on_error == "fail":
        raise RuntimeError(f"{errors} question(s) failed (on_error=fail):\n  "
                           + "\n  ".join(failed))
    if errors:
        log.warning("%d question(s) failed (on_error=%s); e.g. %s", errors, recipe.on_error,
                    failed[0])
    pool = list(pool) if pool else sorted(activation.seen)
    mode, source = (("checkpoint", recipe.checkpoint) if recipe.checkpoint
                    else ("endpoint", str(recipe.endpoint)))
    return EvalSummary(
        scores={name: board.result() for name, board in boards.items()},
        activation=activation.table(pool), pool=pool,
        predictions=storage.join(recipe.output, PREDICTIONS),
        scores_path=storage.join(recipe.output, SCORES),
        report=storage.join(recipe.output, REPORT),
        questions=sum(b.questions for b in boards.values()), errors=errors, mode=mode,
        source=source, error_examples=failed)


def _write_files(recipe: EvalRecipe, summary: EvalSummary) -> dict[str, str]:
    """scores.json and report.md in the output folder (the predictions are written by the
    workers); returns them."""
    files = {
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

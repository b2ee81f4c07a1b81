"""`mova bench eval`: `mova eval` (Ray Data batch inference) on a real-weights checkpoint, once
per LLM engine (``--engine torch,vllm``), on easy-VQA test questions.

Each engine runs the whole job twice on one local Ray: on ``warm`` questions and on
``questions``. A run's wall time includes starting its actor pool (loading the model, and
vLLM's engine), so the marginal rate ``(questions - warm) / (T_questions - T_warm)`` is the
steady items/s, with the start-up cost (``T_warm`` minus its share of items) shown beside it.
Answers of every engine are compared question by question with the first engine's.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from pipelines.bench.harness import machine_info, markdown_table
from pipelines.bench.serve_real import check_engines, engine_overrides
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.ray_init import init_ray
from pipelines.common.recipe import load_recipe
from pipelines.data.benchmarks import convert_easyvqa
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import EvalRecipe

log = logging.getLogger(__name__)

KEY = "bench:eval:real:cpu"


def _recipe(checkpoint: str, manifest: str, limit: int, out: Path, engine: str,
            settings: dict[str, Any]) -> EvalRecipe:
    return load_recipe(EvalRecipe, None, [
        f"checkpoint={checkpoint}", f"output={out}", "routing=model",
        f"max_new_tokens={settings['max_new_tokens']}",
        f"batch_size={settings['batch_size']}", "workers=1",
        f"cpus_per_worker={settings['cpus_per_worker']}",
        f"mlflow.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}",
        "mlflow.experiment=bench-eval", *engine_overrides(engine)],
        fields={"benchmarks": [{"name": "easyvqa", "path": manifest, "limit": limit}]})


def _predictions(summary: Any) -> dict[str, str]:
    """Question id -> prediction, from the written parts."""
    folder = Path(summary.predictions)
    parts = json.loads((folder / "_SUCCESS").read_text())["parts"]
    return {r["id"]: r["prediction"] for part in parts
            for r in map(json.loads, (folder / part).read_text().splitlines())}


def _engine(checkpoint: str, manifest: str, root: Path, engine: str,
            settings: dict[str, Any]) -> dict[str, Any]:
    runs = {}
    for label, limit in (("warm", settings["warm"]), ("full", settings["questions"])):
        out = root / f"{engine.replace(':', '-')}-{label}"
        summary = run_eval(_recipe(checkpoint, manifest, limit, out, engine, settings))
        runs[label] = summary
        log.info("eval %s, %d questions: %.1f s", engine, summary.questions, summary.seconds)
    warm, full = runs["warm"], runs["full"]
    rate = (full.questions - warm.questions) / max(full.seconds - warm.seconds, 1e-9)
    return {"engine": engine, "questions": full.questions, "seconds": full.seconds,
            "warm_questions": warm.questions, "warm_seconds": warm.seconds,
            "items_per_s": rate, "start_s": max(warm.seconds - warm.questions / rate, 0.0),
            "score": full.scores["easyvqa"].score, "errors": full.errors,
            "predictions": _predictions(full)}


def bench_eval(checkpoint: str, *, engines: Sequence[str], questions: int = 96,
               warm: int = 16, batch_size: int = 16, max_new_tokens: int = 8,
               quick: bool = False) -> dict[str, Any]:
    """Run `mova eval` per engine (see the module's docstring)."""
    if quick:
        questions, warm = 16, 4
    checkpoint = local_checkpoint(checkpoint)
    cores = len(os.sched_getaffinity(0))
    # the actor gets every core (torch's threads follow its CPUs; vLLM binds to all of them);
    # Ray counts each core twice so that reading and writing tasks still run beside it
    settings = {"questions": questions, "warm": warm, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "cpus_per_worker": float(cores),
                "checkpoint": checkpoint, "engines": list(engines), "quick": quick}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mova-bench-eval-") as tmp:
        manifest = str(Path(tmp) / "easyvqa.jsonl")
        check_engines(engines, lambda engine: _recipe(checkpoint, manifest, 1,
                                                       Path(tmp) / "check", engine, settings))
        convert_easyvqa("test", manifest, limit=questions)
        init_ray("local", num_cpus=2 * cores, temp_dir=f"{tmp}/ray")
        try:
            for engine in engines:
                rows.append(_engine(checkpoint, manifest, Path(tmp), engine, settings))
        finally:
            ray.shutdown()
    first = rows[0]["predictions"]
    for row in rows:
        row["equal_to_first"] = sum(row["predictions"].get(k) == v for k, v in first.items())
    return {"key": KEY, "machine": machine_info(torch.device("cpu")), "settings": settings,
            "rows": rows}


def render(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    base = result["rows"][0]
    table = [[r["engine"], r["questions"], f"{r['seconds']:.1f}", f"{r['items_per_s']:.2f}",
              f"{r['items_per_s'] / base['items_per_s']:.2f}x", f"{r['start_s']:.0f}",
              f"{100 * r['score']:.1f}%", r["errors"],
              f"{r['equal_to_first']}/{len(base['predictions'])}"] for r in result["rows"]]
    return "\n".join([
        "## `mova bench eval`: `mova eval` on SmolLM2-135M + MiniLM + DINOv2-S, cpu", "",
        f"Reproduce: `mova bench eval --checkpoint <demo-real>/mova --engine "
        f"{','.join(s['engines'])} --questions {s['questions']}`", "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in m.items()), "",
        f"easy-VQA test questions, model routing (constrained), greedy, at most "
        f"{s['max_new_tokens']} answer tokens; one eval actor ({s['cpus_per_worker']:g} CPU, "
        f"batches of {s['batch_size']}) on a local Ray. Each engine runs the job on "
        f"{s['warm']} and on {s['questions']} questions: items/s is the marginal rate between "
        "the two (steady decoding), start-up what the first run spent beyond its items "
        "(actor, model, vLLM's engine). `equal`: answers equal to the first engine's.", "",
        markdown_table(["engine", "questions", "job s", "items/s", "vs first", "start-up s",
                        "accuracy", "errors", "equal"], table)])

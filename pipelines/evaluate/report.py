"""What `mova eval` writes: prediction records, scores, the report and the MLflow run."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.common.tracking import flatten, open_run
from pipelines.evaluate.items import EvalItem
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.evaluate.scoring import (
    BenchmarkScore,
    activation_markdown,
    sample_score,
    scores_markdown,
)

PREDICTIONS, SCORES, REPORT = "predictions", "scores.json", "report.md"
_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-./ :]")


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


def log_mlflow(recipe: EvalRecipe, summary: EvalSummary, files: dict[str, str]) -> None:
    source = Path(recipe.checkpoint).name if recipe.checkpoint else (recipe.endpoint or "")
    tracker = open_run(recipe.mlflow, recipe.output, f"eval-{source}", recipe.joins_cluster())
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
        tracker.log_parts(summary.predictions, f"eval/{PREDICTIONS}")
        tracker.end()
    except BaseException:
        tracker.end("FAILED")
        raise
    summary.mlflow_run_id, summary.tracking_uri = tracker.run_id, tracker.tracking_uri


def report_markdown(summary: EvalSummary, recipe: EvalRecipe) -> str:
    routing = recipe.routing + (f" {recipe.experts}" if recipe.routing == "forced" else "")
    return (f"# MoVA evaluation\n\n{summary.mode}: {summary.source}  \nrouting: {routing}  \n"
            f"max_new_tokens: {recipe.max_new_tokens}  \nquestions: {summary.questions} "
            f"({summary.errors} failed, on_error={recipe.on_error})\n\n"
            f"## Scores (fractions in %)\n\n{scores_markdown(summary.scores)}\n"
            f"## Routing activation rate per expert (%)\n\n"
            f"{activation_markdown(summary.activation, summary.pool)}")

"""Scores and routing statistics of an evaluation, from its prediction records (pure Python).

A prediction record is one row of ``predictions.jsonl``: ``benchmark``, ``id``, ``domain``,
``prediction``, ``answers``, ``metric``, ``meta``, ``experts`` (the routed expert names, None
when the question failed), ``error`` (None, or why there is no prediction) and ``score``.

Scoring rules:

- Every record gets its per-sample ``score`` with its own metric (``mova.metrics.score``).
- A benchmark whose rows all carry ``meta.benchmark == "pope"`` is scored with
  :func:`mova.metrics.pope_scores`; its headline is the F1 ("yes" positive), averaged over the
  POPE categories (adversarial, popular, random) when the rows name them.
- ``meta.benchmark == "mme"`` rows are scored with :func:`mova.metrics.mme_scores`; the
  headline is the perception score (sum of the perception categories, max 2000) and
  ``cognition`` is reported beside it.
- Any other benchmark's headline is the mean per-sample score, named after its metric
  (``mixed`` when the rows use several metrics, as the synthetic test split does), with a
  breakdown per ``domain`` and per metric.
- A failed question (unreadable image, failed request) is, by ``on_error``: ``empty``, scored
  as an empty answer by the benchmark's own rules (0 for per-sample metrics; POPE counts an
  unparsable answer as "no", MME as wrong); ``skip``, left out of the scores.

Routing activation: for each benchmark (and each domain inside it), the share of answered
questions whose routing selected each expert, as in the paper's activation table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mova.metrics import mme_scores, pope_scores, score

ON_ERROR = ("empty", "skip")
YES_NO_BENCHMARKS = ("pope", "mme")
MEAN_EXPERTS = "experts/q"


@dataclass
class BenchmarkScore:
    """One benchmark's result; ``score`` is the headline value named ``headline``."""

    benchmark: str
    kind: str  # "pope", "mme" or "mean"
    metric: str  # the per-sample metric (or "mixed")
    headline: str
    score: float
    unit: str  # "fraction" (shown as %) or "points" (MME)
    questions: int
    scored: int
    errors: int
    details: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_score(record: Mapping[str, Any], on_error: str = "empty") -> float | None:
    """The record's per-sample score; None for a failed record under ``on_error="skip"``."""
    _check_policy(on_error)
    if record.get("error"):
        return 0.0 if on_error == "empty" else None
    return score(str(record["metric"]), str(record["prediction"]), list(record["answers"]))


def benchmark_kind(records: Sequence[Mapping[str, Any]]) -> str:
    """``pope`` or ``mme`` when every row says so in ``meta.benchmark``, else ``mean``."""
    names = {(r.get("meta") or {}).get("benchmark") for r in records}
    if len(names) == 1:
        (name,) = names
        if name in YES_NO_BENCHMARKS:
            return str(name)
    return "mean"


def score_benchmark(name: str, records: Sequence[Mapping[str, Any]],
                    on_error: str = "empty") -> BenchmarkScore:
    """Aggregate one benchmark's prediction records (see the module doc for the rules)."""
    board = BenchmarkBoard(name, on_error)
    for record in records:
        board.add(record)
    return board.result()


class BenchmarkBoard:
    """One benchmark's scores, added up record by record: sums and counts for per-sample
    metrics (constant memory), and the few fields the yes/no benchmarks (POPE, MME: fixed,
    small sets) need to be scored by their own rules."""

    def __init__(self, name: str, on_error: str = "empty") -> None:
        _check_policy(on_error)
        self.name, self.on_error = name, on_error
        self.questions = self.errors = 0
        self.kinds: set[str | None] = set()
        self.metrics: set[str] = set()
        self.sums: dict[str, list[float]] = {}  # "", "domain/x", "metric/y" -> [sum, count]
        self.yes_no: list[dict[str, Any]] | None = []  # kept while every row is POPE/MME

    def add(self, record: Mapping[str, Any]) -> None:
        self.questions += 1
        failed = bool(record.get("error"))
        self.errors += failed
        meta = record.get("meta") or {}
        self.kinds.add(meta.get("benchmark"))
        self.metrics.add(str(record["metric"]))
        if failed and self.on_error == "skip":
            return
        value = record.get("score")
        if value is None:
            value = sample_score(record, self.on_error)
        keys = ["", f"metric/{record['metric']}"]
        if record.get("domain"):
            keys.append(f"domain/{record['domain']}")
        for key in keys:
            total = self.sums.setdefault(key, [0.0, 0])
            total[0] += value
            total[1] += 1
        if self.yes_no is not None and meta.get("benchmark") in YES_NO_BENCHMARKS \
                and len(self.kinds) == 1:
            self.yes_no.append({"id": record.get("id"), "error": failed,
                                "prediction": _prediction(record),
                                "answers": list(record["answers"][:1]),
                                "meta": {k: meta[k] for k in ("benchmark", "label", "category",
                                                              "image_id") if k in meta}})
        else:
            self.yes_no = None

    @property
    def kind(self) -> str:
        if len(self.kinds) == 1 and self.yes_no is not None:
            (name,) = self.kinds
            if name in YES_NO_BENCHMARKS:
                return str(name)
        return "mean"

    def result(self) -> BenchmarkScore:
        if not self.questions:
            raise ValueError(f"benchmark {self.name!r}: no prediction records")
        metrics = sorted(self.metrics)
        kept = self.sums.get("", [0.0, 0])[1]
        result = BenchmarkScore(
            benchmark=self.name, kind=self.kind,
            metric=metrics[0] if len(metrics) == 1 else "mixed", headline="", score=0.0,
            unit="fraction", questions=self.questions, scored=kept, errors=self.errors)
        if not kept:
            result.headline = result.metric if result.kind == "mean" else _HEADLINES[result.kind]
        elif result.kind == "pope":
            _score_pope(result, self.yes_no or [])
        elif result.kind == "mme":
            _score_mme(result, self.yes_no or [])
        else:
            result.headline = result.metric
            result.score = self.sums[""][0] / kept
            result.details = {
                key: total / count for key, (total, count) in sorted(self.sums.items())
                if key.startswith("domain/") or (key.startswith("metric/") and len(metrics) > 1)
            }
        return result


_HEADLINES = {"pope": "f1", "mme": "perception"}


def _prediction(record: Mapping[str, Any]) -> str:
    return "" if record.get("error") else str(record["prediction"])


def _label(record: Mapping[str, Any]) -> str:
    meta = record.get("meta") or {}
    if "label" in meta:
        return str(meta["label"])
    return str(record["answers"][0])


def _score_pope(result: BenchmarkScore, records: Sequence[Mapping[str, Any]]) -> None:
    overall = pope_scores([_prediction(r) for r in records], [_label(r) for r in records])
    details = {k: float(v) for k, v in overall.items()}
    by_category: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        category = (r.get("meta") or {}).get("category")
        if category is not None:
            by_category.setdefault(str(category), []).append(r)
    f1s = []
    if by_category and sum(len(v) for v in by_category.values()) == len(records):
        for category, rows in sorted(by_category.items()):
            part = pope_scores([_prediction(r) for r in rows], [_label(r) for r in rows])
            for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
                details[f"{category}/{key}"] = float(part[key])
            f1s.append(float(part["f1"]))
    result.headline = "f1"
    result.score = math.fsum(f1s) / len(f1s) if f1s else float(overall["f1"])
    result.details = details


def _score_mme(result: BenchmarkScore, records: Sequence[Mapping[str, Any]]) -> None:
    rows = []
    for i, r in enumerate(records):
        meta = r.get("meta") or {}
        missing = [k for k in ("category", "image_id") if k not in meta]
        if missing:
            raise ValueError(f"benchmark {result.benchmark!r} record {i} ({r.get('id')}): MME "
                             f"rows need meta {missing}")
        rows.append({"category": meta["category"], "image_id": meta["image_id"],
                     "prediction": _prediction(r), "label": _label(r)})
    scores = mme_scores(rows)
    details: dict[str, float] = {}
    for key, value in scores.items():
        if key in ("perception", "cognition"):
            details[key] = float(value["score"])
            continue
        for part in ("score", "acc", "acc_plus"):
            details[f"{key}/{part}"] = float(value[part])
    result.headline, result.unit = "perception", "points"
    result.score = details["perception"]
    result.details = details


class ActivationBoard:
    """Routing activation counts per benchmark (and per domain): for each, how many answered
    questions routed each expert, and how many experts in all."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.domains: dict[str, set[str]] = {}
        self.seen: list[str] = []  # expert names in first-seen order

    def add(self, record: Mapping[str, Any]) -> None:
        bench = str(record["benchmark"])
        self.rows.setdefault(bench, {})
        self.domains.setdefault(bench, set())
        if record.get("domain"):
            self.domains[bench].add(str(record["domain"]))
        if record.get("error") or record.get("experts") is None:
            return
        for row in [bench] + ([f"{bench}/{record['domain']}"] if record.get("domain") else []):
            counts = self.rows.setdefault(row, {})
            counts["\tanswered"] = counts.get("\tanswered", 0) + 1
            counts["\texperts"] = counts.get("\texperts", 0) + len(record["experts"])
            for name in set(record["experts"]):
                counts[name] = counts.get(name, 0) + 1
                if name not in self.seen:
                    self.seen.append(name)

    def table(self, pool: Sequence[str]) -> dict[str, dict[str, float]]:
        """Rows ``<benchmark>`` and, when a benchmark has several domains,
        ``<benchmark>/<domain>`` -> expert -> activation rate, plus ``experts/q``."""
        out: dict[str, dict[str, float]] = {}
        for bench in self.domains:
            names = [bench] + ([f"{bench}/{d}" for d in sorted(self.domains[bench])]
                               if len(self.domains[bench]) > 1 else [])
            for row in names:
                counts = self.rows.get(row, {})
                n = counts.get("\tanswered", 0)
                rates = {e: (counts.get(e, 0) / n if n else 0.0)
                         for e in [*pool, *(k for k in counts if not k.startswith("\t")
                                            and k not in pool)]}
                rates[MEAN_EXPERTS] = counts.get("\texperts", 0) / n if n else 0.0
                out[row] = rates
        return out


def activation_table(records: Sequence[Mapping[str, Any]], pool: Sequence[str]
                     ) -> dict[str, dict[str, float]]:
    """:class:`ActivationBoard` over a list of records."""
    board = ActivationBoard()
    for record in records:
        board.add(record)
    return board.table(pool)


def score_all(records: Sequence[Mapping[str, Any]], on_error: str = "empty"
              ) -> dict[str, BenchmarkScore]:
    """:func:`score_benchmark` for every benchmark in ``records`` (in first-seen order)."""
    boards: dict[str, BenchmarkBoard] = {}
    for r in records:
        bench = str(r["benchmark"])
        boards.setdefault(bench, BenchmarkBoard(bench, on_error)).add(r)
    return {name: board.result() for name, board in boards.items()}


def _value(value: float, unit: str) -> str:
    return f"{value:.1f}" if unit == "points" else f"{100 * value:.1f}"


def scores_markdown(scores: Mapping[str, BenchmarkScore]) -> str:
    """The score table (fractions shown as percentages) and each benchmark's details."""
    lines = ["| benchmark | metric | score | questions | scored | errors |",
             "|---|---|---:|---:|---:|---:|"]
    for s in scores.values():
        lines.append(f"| {s.benchmark} | {s.headline} | {_value(s.score, s.unit)} | "
                     f"{s.questions} | {s.scored} | {s.errors} |")
    for s in scores.values():
        if not s.details:
            continue
        parts = []
        for key, value in s.details.items():
            last = key.rsplit("/", 1)[-1]
            if last in ("tp", "fp", "tn", "fn", "unparsable"):
                parts.append(f"{key} {int(value)}")
            elif s.unit == "points" and last in ("score", "perception", "cognition"):
                parts.append(f"{key} {value:.1f}")
            elif s.unit == "points":
                parts.append(f"{key} {value:.1f}%")  # MME acc / acc_plus are percentages
            else:
                parts.append(f"{key} {100 * value:.1f}")
        lines.append(f"\n{s.benchmark}: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def activation_markdown(table: Mapping[str, Mapping[str, float]], pool: Sequence[str]) -> str:
    """The activation table: one row per benchmark (and domain), one column per expert (%)."""
    header = "| benchmark | " + " | ".join(pool) + f" | {MEAN_EXPERTS} |"
    lines = [header, "|---|" + "---:|" * (len(pool) + 1)]
    for row, rates in table.items():
        cells = " | ".join(f"{100 * rates.get(name, 0.0):.1f}" for name in pool)
        lines.append(f"| {row} | {cells} | {rates.get(MEAN_EXPERTS, 0.0):.2f} |")
    return "\n".join(lines) + "\n"


def _check_policy(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")

"""The questions of benchmark files: read, checked, and what each asks and expects."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mova.tokenizers import IMAGE_TOKEN
from pipelines.common import storage
from pipelines.evaluate.recipe import BenchmarkSpec, EvalRecipe

log = logging.getLogger(__name__)


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


def routing_for(item: EvalItem, recipe: EvalRecipe) -> list[str] | None:
    if recipe.routing == "forced":
        return list(recipe.experts)
    if recipe.routing == "label":
        return list(item.experts or [])
    return None

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
from pipelines.common.manifests.validate import resolve_image

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


def item_of(sample: Any, file: str, benchmark: str, metric: str | None, routing: str = "model",
            pool: Sequence[str] | None = None) -> EvalItem | None:
    """One manifest row as a question to ask (None for a routing-instruction row); a row that
    cannot be asked is an error naming the benchmark, the file and the row."""
    if sample.kind == "routing":
        return None
    where = f"benchmark {benchmark!r} ({file}) row {sample.id!r}"
    if not sample.image:
        raise ValueError(f"{where}: no image; a MoVA question needs one")
    last = max(i for i, t in enumerate(sample.conversations) if t["from"] == "human")
    answers = sample.answers
    if not answers:
        tail = sample.conversations[last + 1:]
        if not tail or not tail[0]["value"].strip():
            raise ValueError(f"{where}: no reference answers (answers is empty and no gpt turn "
                             "follows the last question)")
        answers = [tail[0]["value"]]
    metric = sample.metric or metric
    if metric is None:
        raise ValueError(f"{where}: no metric; set the row's metric or the benchmark entry's "
                         "metric")
    if routing == "label":
        if sample.experts is None:
            raise ValueError(f"{where}: routing=label needs a routing label (experts) on every "
                             "row")
        unknown = [e for e in sample.experts if pool is not None and e not in pool]
        if unknown:
            raise ValueError(f"{where}: routing label {unknown} is not in the model's pool "
                             f"{list(pool or [])}")
    return EvalItem(
        benchmark=benchmark, id=sample.id, image=_norm(resolve_image(file, sample.image)),
        turns=[dict(t) for t in sample.conversations[:last + 1]], answers=list(answers),
        metric=metric, domain=sample.domain,
        experts=list(sample.experts) if sample.experts is not None else None,
        meta=dict(sample.meta or {}))


def _norm(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.normpath(uri)

"""What every benchmark converter shares: prompt suffixes, metrics, the sample it writes, and
checked access to the source files' records."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mova.tokenizers import IMAGE_TOKEN
from pipelines.common import storage
from pipelines.common.manifests.schema import Sample
from pipelines.common.manifests.validate import write_manifest

logger = logging.getLogger(__name__)

SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_OR_NO = "Please answer yes or no."
PROMPT_SUFFIXES: dict[str, str] = {
    "vqav2": SHORT_ANSWER,
    "textvqa": SHORT_ANSWER,
    "docvqa": SHORT_ANSWER,
    "chartqa": SHORT_ANSWER,
    "gqa": SHORT_ANSWER,
    "pope": YES_OR_NO,
    "mme": YES_OR_NO,
    "easyvqa": SHORT_ANSWER,
}
BENCHMARK_METRICS: dict[str, str] = {
    "vqav2": "vqa_accuracy",
    "textvqa": "vqa_accuracy",
    "docvqa": "anls",
    "chartqa": "relaxed_accuracy",
    "gqa": "exact_match",
    "pope": "exact_match",
    "mme": "exact_match",
    "easyvqa": "exact_match",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EASYVQA_SPLITS = ("train", "test")


def build_prompt(benchmark: str, question: str) -> str:
    """The human turn for ``question``: the image placeholder, the question, the suffix.

    A question that already ends with the suffix (MME's do) does not get it twice.
    """
    if benchmark not in PROMPT_SUFFIXES:
        raise ValueError(f"benchmark: unknown {benchmark!r}; expected one of "
                         f"{sorted(PROMPT_SUFFIXES)}")
    text = question.replace(IMAGE_TOKEN, "").strip()
    suffix = PROMPT_SUFFIXES[benchmark]
    if suffix and not text.endswith(suffix):
        text = f"{text}\n{suffix}"
    return f"{IMAGE_TOKEN}\n{text}"


def make_sample(benchmark: str, ident: str, image: str, question: Any, answers: Sequence[Any],
            where: str, meta: dict[str, Any]) -> Sample:
    """One evaluation sample; the gpt turn is the most common reference (ties: first seen)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: question: expected a non-empty string, got {question!r}")
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(f"{where}: answers: expected a non-empty list, got {answers!r}")
    refs = [str(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a
            for a in answers]
    if not all(isinstance(a, str) for a in refs) or not any(a.strip() for a in refs):
        raise ValueError(f"{where}: answers: expected strings (one non-empty), got {answers!r}")
    best = Counter(a.strip() for a in refs if a.strip()).most_common(1)[0][0]
    prompt = build_prompt(benchmark, question)
    return Sample(
        id=ident, image=image,
        conversations=[{"from": "human", "value": prompt}, {"from": "gpt", "value": best}],
        answers=list(refs), metric=BENCHMARK_METRICS[benchmark],
        meta={"benchmark": benchmark, "question": question, **meta},
    )


def load_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON: {exc}") from exc


def records(data: Any, uri: str, key: str | None) -> list:
    """``data[key]`` (or ``data`` itself when ``key`` is None), checked to be a list."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{uri}: expected a JSON object with a {key!r} list")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{uri}: expected a list of records, got {type(data).__name__}")
    return data


def field(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where}: missing {key!r}")
    return record[key]


def write(benchmark: str, samples: list[Sample], src: str, out_uri: str) -> int:
    write_manifest(samples, out_uri)
    logger.info("converted %d %s question(s) from %s to %s", len(samples), benchmark, src,
                out_uri)
    return len(samples)


def image_root_of(src: str, image_root: str | None) -> str:
    return image_root if image_root is not None else storage.parent(src)

"""Converters from common public formats to the manifest schema.

``convert_llava`` reads LLaVA instruction JSON (a list of ``{"id", "image", "conversations"}``);
``convert_vqa`` reads generic VQA JSON lines (``{"image", "question", "answers" | "answer"}``).
A malformed input row raises ``ValueError`` naming its row number: nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

from mova.conversation import validate_turns
from mova.metrics import METRICS
from mova.tokenizers import IMAGE_TOKEN
from pipelines.common import storage
from pipelines.common.manifests.schema import Sample
from pipelines.common.manifests.validate import write_manifest

logger = logging.getLogger(__name__)


def _image_ref(image: Any, where: str, image_root: str, out_uri: str) -> str:
    """The image as the output manifest should name it.

    Relative input paths are relative to ``image_root``. A local image in a local manifest is
    written relative to the manifest's folder (the data set stays relocatable); otherwise the
    full path or URI is written.
    """
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: image: expected a non-empty path string, got {image!r}")
    full = image if storage.is_remote(image) or os.path.isabs(image) else storage.join(
        image_root, image)
    if storage.is_remote(full):
        return full
    full = os.path.abspath(full)
    if storage.is_remote(out_uri):
        return full
    return os.path.relpath(full, os.path.abspath(storage.parent(out_uri)))


def _row_id(value: Any, where: str, seen: dict[str, str]) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{where}: id: expected a non-empty string or an int, got {value!r}")
    ident = str(value)
    if ident in seen:
        raise ValueError(f"{where}: duplicate id {ident!r} (first in {seen[ident]})")
    seen[ident] = where
    return ident


def convert_llava(json_uri: str, out_uri: str, image_root: str | None = None) -> int:
    """Convert a LLaVA JSON file to a manifest; returns the number of samples written.

    A record without an ``image`` key is a text-only sample.
    """
    root = image_root if image_root is not None else storage.parent(json_uri)
    try:
        records = json.loads(storage.read_text(json_uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_uri}: not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{json_uri}: expected a JSON list of samples, got "
                         f"{type(records).__name__}")
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for number, record in enumerate(records, start=1):
        where = f"{json_uri} row {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        if "conversations" not in record:
            raise ValueError(f"{where}: missing 'conversations'")
        try:
            turns = validate_turns(record["conversations"])
        except ValueError as exc:
            raise ValueError(f"{where}: conversations: {exc}") from exc
        image = record.get("image")
        samples.append(Sample(
            id=_row_id(record.get("id"), where, seen),
            image=None if image is None else _image_ref(image, where, root, out_uri),
            conversations=turns,
        ))
    write_manifest(samples, out_uri)
    logger.info("converted %d LLaVA record(s) from %s to %s", len(samples), json_uri, out_uri)
    return len(samples)


def _answers(record: dict, where: str) -> list[str]:
    if "answers" in record:
        raw = record["answers"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: answers: expected a non-empty list, got {raw!r}")
        # VQAv2 style: [{"answer": "...", "answer_confidence": ...}, ...]
        answers = [a.get("answer") if isinstance(a, dict) else a for a in raw]
    elif "answer" in record:
        answers = [record["answer"]]
    else:
        raise ValueError(f"{where}: expected 'answers' (a list) or 'answer' (a string)")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{where}: answers: expected non-empty strings, got {answers!r}")
    return answers


def convert_vqa(
    jsonl_uri: str, out_uri: str, image_root: str | None = None, metric: str = "vqa_accuracy"
) -> int:
    """Convert VQA JSON lines to a manifest; returns the number of samples written.

    Each row becomes one turn pair: ``<image>\\n{question}`` and the most common answer (ties:
    the first seen); all answers are kept as evaluation references scored with ``metric``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: unknown {metric!r}; expected one of {sorted(METRICS)}")
    root = image_root if image_root is not None else storage.parent(jsonl_uri)
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for number, line in enumerate(storage.read_text(jsonl_uri).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{jsonl_uri} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: question: expected a non-empty string, got {question!r}")
        if "image" not in record:
            raise ValueError(f"{where}: missing 'image'")
        answers = _answers(record, where)
        ident = record.get("id", record.get("question_id", f"vqa-{number}"))
        prompt = question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"
        best = Counter(a.strip() for a in answers).most_common(1)[0][0]
        samples.append(Sample(
            id=_row_id(ident, where, seen),
            image=_image_ref(record["image"], where, root, out_uri),
            conversations=[{"from": "human", "value": prompt}, {"from": "gpt", "value": best}],
            answers=answers,
            metric=metric,
        ))
    write_manifest(samples, out_uri)
    logger.info("converted %d VQA record(s) from %s to %s", len(samples), jsonl_uri, out_uri)
    return len(samples)

"""Converters from the public evaluation benchmarks' own formats to the manifest schema.

Each ``convert_<name>(src, out_uri, image_root=None, ...) -> int`` writes one sample per
question: a human turn ``<image>\\n{question}\\n{suffix}`` (the prompt suffix the community
uses for that benchmark, :data:`PROMPT_SUFFIXES`), a gpt turn with the most common reference,
all references in ``answers`` and the benchmark's metric in ``metric``. ``meta`` keeps the
benchmark name, the raw question and the public ids, so predictions can be mapped back to the
official submission formats. POPE and MME are scored per sample with ``exact_match`` on
"yes"/"no"; their ``meta`` carries what :func:`mova.metrics.pope_scores` and
:func:`mova.metrics.mme_scores` need (``benchmark``, ``label``, and for MME ``category`` and
``image_id``). Image paths are written as :func:`pipelines.data.convert.convert_vqa` does:
relative to the output manifest's folder when both are local. A malformed record raises
``ValueError`` naming the file and the record; nothing is dropped silently.
"""

from __future__ import annotations

import importlib
import os
import posixpath
from collections.abc import Callable
from typing import Any

from pipelines.common import storage
from pipelines.data.benchmark_format import (
    BENCHMARK_METRICS,
    EASYVQA_SPLITS,
    PROMPT_SUFFIXES,
    SHORT_ANSWER,
    YES_OR_NO,
    build_prompt,
    field,
    image_root_of,
    load_json,
    make_sample,
    records,
    write,
)
from pipelines.data.convert import _image_ref, _row_id
from pipelines.data.yes_no import convert_mme, convert_pope

__all__ = ["BENCHMARK_CONVERTERS", "BENCHMARK_METRICS", "PROMPT_SUFFIXES", "SHORT_ANSWER",
           "YES_OR_NO", "build_prompt", "convert_benchmark", "convert_mme", "convert_pope"]

def convert_vqav2(src: str, out_uri: str, image_root: str | None = None,
                  annotations: str | None = None) -> int:
    """VQAv2: ``src`` is the questions JSON, ``annotations`` the annotations JSON.

    Without ``annotations``, the official sibling name is used (``v2_OpenEnded_mscoco_val2014_
    questions.json`` -> ``v2_mscoco_val2014_annotations.json``). Images are
    ``COCO_{data_subtype}_{image_id:012d}.jpg`` under ``image_root`` (``data_subtype`` from the
    questions file, default ``val2014``).
    """
    if annotations is None:
        name = posixpath.basename(src).replace("OpenEnded_", "").replace("questions",
                                                                          "annotations")
        annotations = storage.join(storage.parent(src), name)
        if annotations == src or not storage.exists(annotations):
            raise ValueError(f"{src}: no annotations file given and {annotations} does not "
                             "exist; pass the annotations JSON (--annotations)")
    data = load_json(src)
    subtype = data.get("data_subtype", "val2014") if isinstance(data, dict) else "val2014"
    refs: dict[Any, dict] = {}
    for number, ann in enumerate(records(load_json(annotations), annotations, "annotations"),
                                 start=1):
        refs[field(ann, "question_id", f"{annotations} annotation {number}")] = ann
    root, seen, samples = image_root_of(src, image_root), {}, []
    for number, rec in enumerate(records(data, src, "questions"), start=1):
        where = f"{src} question {number}"
        qid, image_id = field(rec, "question_id", where), field(rec, "image_id", where)
        if qid not in refs:
            raise ValueError(f"{where}: question_id {qid!r} has no entry in {annotations}")
        ann = refs[qid]
        raw = field(ann, "answers", f"{annotations} question_id {qid}")
        if not isinstance(raw, list):
            raise ValueError(f"{annotations} question_id {qid}: answers: expected a list of "
                             f"{{'answer': ...}} objects, got {raw!r}")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in raw]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{where}: image_id: expected an int, got {image_id!r}")
        image = _image_ref(f"COCO_{subtype}_{image_id:012d}.jpg", where, root, out_uri)
        sample = make_sample("vqav2", _row_id(qid, where, seen), image, rec.get("question"),
                         answers, where, {"question_id": qid, "image_id": image_id})
        mc = ann.get("multiple_choice_answer")
        if isinstance(mc, str) and mc.strip():
            sample.conversations[1]["value"] = mc.strip()  # the official consensus answer
        samples.append(sample)
    return write("vqav2", samples, src, out_uri)


def convert_textvqa(src: str, out_uri: str, image_root: str | None = None) -> int:
    """TextVQA JSON (``{"data": [{question_id, question, image_id, answers}]}``).

    Images are ``{image_id}.jpg`` under ``image_root`` (TextVQA's ``train_images/`` for val).
    """
    root, seen, samples = image_root_of(src, image_root), {}, []
    for number, rec in enumerate(records(load_json(src), src, "data"), start=1):
        where = f"{src} record {number}"
        qid, image_id = field(rec, "question_id", where), field(rec, "image_id", where)
        image = _image_ref(f"{image_id}.jpg", where, root, out_uri)
        samples.append(make_sample("textvqa", _row_id(qid, where, seen), image,
                               rec.get("question"), field(rec, "answers", where), where,
                               {"question_id": qid, "image_id": image_id}))
    return write("textvqa", samples, src, out_uri)


def convert_docvqa(src: str, out_uri: str, image_root: str | None = None) -> int:
    """DocVQA JSON (``{"data": [{questionId, question, image, answers}]}``); scored by ANLS.

    ``image`` (e.g. ``documents/x.png``) is relative to ``image_root`` (default: the JSON's
    folder, where the official release keeps ``documents/``).
    """
    root, seen, samples = image_root_of(src, image_root), {}, []
    for number, rec in enumerate(records(load_json(src), src, "data"), start=1):
        where = f"{src} record {number}"
        qid = field(rec, "questionId", where)
        image = _image_ref(field(rec, "image", where), where, root, out_uri)
        meta = {"question_id": qid, "doc_id": rec.get("docId"),
                "page": rec.get("ucsf_document_page_no")}
        samples.append(make_sample("docvqa", _row_id(qid, where, seen), image, rec.get("question"),
                               field(rec, "answers", where), where,
                               {k: v for k, v in meta.items() if v is not None}))
    return write("docvqa", samples, src, out_uri)


def convert_chartqa(src: str, out_uri: str, image_root: str | None = None) -> int:
    """ChartQA JSON (a list of ``{imgname, query, label}``); scored by relaxed accuracy.

    Images default to ``<json folder>/png/`` (the release layout) when that folder exists.
    Ids are ``{json stem}-{index}`` (for example ``test_human-0``), as ChartQA has none.
    """
    if image_root is None:
        png = storage.join(storage.parent(src), "png")
        image_root = png if storage.exists(png) else storage.parent(src)
    stem = posixpath.splitext(posixpath.basename(src))[0]
    seen, samples = {}, []
    for index, rec in enumerate(records(load_json(src), src, None)):
        where = f"{src} record {index + 1}"
        image = _image_ref(field(rec, "imgname", where), where, image_root, out_uri)
        samples.append(make_sample("chartqa", _row_id(f"{stem}-{index}", where, seen), image,
                               field(rec, "query", where), [field(rec, "label", where)],
                               where, {"image_id": rec["imgname"], "source": stem}))
    return write("chartqa", samples, src, out_uri)


def convert_gqa(src: str, out_uri: str, image_root: str | None = None) -> int:
    """GQA questions JSON (an object: question id -> ``{imageId, question, answer}``).

    Images are ``{imageId}.jpg`` under ``image_root``; scored by exact match.
    """
    data = load_json(src)
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected a JSON object of question id -> record, got "
                         f"{type(data).__name__}")
    root, seen, samples = image_root_of(src, image_root), {}, []
    for qid, rec in data.items():
        where = f"{src} question {qid}"
        image_id = field(rec, "imageId", where)
        image = _image_ref(f"{image_id}.jpg", where, root, out_uri)
        samples.append(make_sample("gqa", _row_id(qid, where, seen), image, rec.get("question"),
                               [field(rec, "answer", where)], where,
                               {"question_id": qid, "image_id": image_id}))
    return write("gqa", samples, src, out_uri)


def _easy_vqa() -> Any:
    try:
        return importlib.import_module("easy_vqa")
    except ImportError as exc:
        raise ImportError("easy-VQA needs the easy-vqa package: pip install easy-vqa "
                          "(note: its wheel also installs a top-level 'test' package)") from exc


def convert_easyvqa(src: str | None, out_uri: str, image_root: str | None = None, *,
                    split: str | None = None, limit: int | None = None) -> int:
    """easy-VQA from the installed ``easy-vqa`` package (``src``: None or the split name).

    ``split`` is ``train`` or ``test`` (default ``test``); ``limit`` keeps the first N
    questions. Images are the package's own files, referenced by absolute path.
    """
    if src not in (None, "", *EASYVQA_SPLITS):
        raise ValueError(f"src={src!r}: expected None or a split name {EASYVQA_SPLITS}")
    if split is not None and src and split != src:
        raise ValueError(f"split={split!r} contradicts src={src!r}; give one of them")
    split = split or src or "test"
    if split not in EASYVQA_SPLITS:
        raise ValueError(f"split: expected one of {EASYVQA_SPLITS}, got {split!r}")
    if image_root is not None:
        raise ValueError(f"image_root={image_root!r}: easy-VQA images come from the package; "
                         "expected None")
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected a positive int or None, got {limit!r}")
    package = _easy_vqa()
    texts, answers, image_ids = getattr(package, f"get_{split}_questions")()
    paths = getattr(package, f"get_{split}_image_paths")()
    if not len(texts) == len(answers) == len(image_ids):
        raise ValueError(f"easy_vqa.get_{split}_questions(): {len(texts)} questions, "
                         f"{len(answers)} answers, {len(image_ids)} image ids; expected equal")
    count = len(texts) if limit is None else min(limit, len(texts))
    seen, samples = {}, []
    for index in range(count):
        where = f"easy-VQA {split} question {index}"
        image_id = image_ids[index]
        if image_id not in paths:
            raise ValueError(f"{where}: image id {image_id!r} has no path in "
                             f"get_{split}_image_paths()")
        samples.append(make_sample("easyvqa", _row_id(f"easyvqa-{split}-{index}", where, seen),
                               os.path.abspath(paths[image_id]), texts[index], [answers[index]],
                               where, {"split": split, "image_id": image_id}))
    return write("easyvqa", samples, f"easy-VQA {split}", out_uri)


BENCHMARK_CONVERTERS: dict[str, Callable[..., int]] = {
    "vqav2": convert_vqav2,
    "textvqa": convert_textvqa,
    "docvqa": convert_docvqa,
    "chartqa": convert_chartqa,
    "gqa": convert_gqa,
    "pope": convert_pope,
    "mme": convert_mme,
    "easyvqa": convert_easyvqa,
}


def convert_benchmark(name: str, src: str | None, out_uri: str, image_root: str | None = None,
                      **options: Any) -> int:
    """Run the converter registered under ``name``; returns the number of samples written."""
    if name not in BENCHMARK_CONVERTERS:
        raise ValueError(f"benchmark: unknown {name!r}; expected one of "
                         f"{sorted(BENCHMARK_CONVERTERS)}")
    return BENCHMARK_CONVERTERS[name](src, out_uri, image_root=image_root, **options)

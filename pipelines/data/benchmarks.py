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
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from mova.tokenizers import IMAGE_TOKEN
from pipelines import storage
from pipelines.data.convert import _image_ref, _row_id
from pipelines.data.manifest import write_manifest
from pipelines.data.schema import Sample

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


def _sample(benchmark: str, ident: str, image: str, question: Any, answers: Sequence[Any],
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


def _load_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON: {exc}") from exc


def _records(data: Any, uri: str, key: str | None) -> list:
    """``data[key]`` (or ``data`` itself when ``key`` is None), checked to be a list."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{uri}: expected a JSON object with a {key!r} list")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{uri}: expected a list of records, got {type(data).__name__}")
    return data


def _field(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where}: missing {key!r}")
    return record[key]


def _write(benchmark: str, samples: list[Sample], src: str, out_uri: str) -> int:
    write_manifest(samples, out_uri)
    logger.info("converted %d %s question(s) from %s to %s", len(samples), benchmark, src,
                out_uri)
    return len(samples)


def _root(src: str, image_root: str | None) -> str:
    return image_root if image_root is not None else storage.parent(src)


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
    data = _load_json(src)
    subtype = data.get("data_subtype", "val2014") if isinstance(data, dict) else "val2014"
    refs: dict[Any, dict] = {}
    for number, ann in enumerate(_records(_load_json(annotations), annotations, "annotations"),
                                 start=1):
        refs[_field(ann, "question_id", f"{annotations} annotation {number}")] = ann
    root, seen, samples = _root(src, image_root), {}, []
    for number, rec in enumerate(_records(data, src, "questions"), start=1):
        where = f"{src} question {number}"
        qid, image_id = _field(rec, "question_id", where), _field(rec, "image_id", where)
        if qid not in refs:
            raise ValueError(f"{where}: question_id {qid!r} has no entry in {annotations}")
        ann = refs[qid]
        raw = _field(ann, "answers", f"{annotations} question_id {qid}")
        if not isinstance(raw, list):
            raise ValueError(f"{annotations} question_id {qid}: answers: expected a list of "
                             f"{{'answer': ...}} objects, got {raw!r}")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in raw]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{where}: image_id: expected an int, got {image_id!r}")
        image = _image_ref(f"COCO_{subtype}_{image_id:012d}.jpg", where, root, out_uri)
        sample = _sample("vqav2", _row_id(qid, where, seen), image, rec.get("question"),
                         answers, where, {"question_id": qid, "image_id": image_id})
        mc = ann.get("multiple_choice_answer")
        if isinstance(mc, str) and mc.strip():
            sample.conversations[1]["value"] = mc.strip()  # the official consensus answer
        samples.append(sample)
    return _write("vqav2", samples, src, out_uri)


def convert_textvqa(src: str, out_uri: str, image_root: str | None = None) -> int:
    """TextVQA JSON (``{"data": [{question_id, question, image_id, answers}]}``).

    Images are ``{image_id}.jpg`` under ``image_root`` (TextVQA's ``train_images/`` for val).
    """
    root, seen, samples = _root(src, image_root), {}, []
    for number, rec in enumerate(_records(_load_json(src), src, "data"), start=1):
        where = f"{src} record {number}"
        qid, image_id = _field(rec, "question_id", where), _field(rec, "image_id", where)
        image = _image_ref(f"{image_id}.jpg", where, root, out_uri)
        samples.append(_sample("textvqa", _row_id(qid, where, seen), image,
                               rec.get("question"), _field(rec, "answers", where), where,
                               {"question_id": qid, "image_id": image_id}))
    return _write("textvqa", samples, src, out_uri)


def convert_docvqa(src: str, out_uri: str, image_root: str | None = None) -> int:
    """DocVQA JSON (``{"data": [{questionId, question, image, answers}]}``); scored by ANLS.

    ``image`` (e.g. ``documents/x.png``) is relative to ``image_root`` (default: the JSON's
    folder, where the official release keeps ``documents/``).
    """
    root, seen, samples = _root(src, image_root), {}, []
    for number, rec in enumerate(_records(_load_json(src), src, "data"), start=1):
        where = f"{src} record {number}"
        qid = _field(rec, "questionId", where)
        image = _image_ref(_field(rec, "image", where), where, root, out_uri)
        meta = {"question_id": qid, "doc_id": rec.get("docId"),
                "page": rec.get("ucsf_document_page_no")}
        samples.append(_sample("docvqa", _row_id(qid, where, seen), image, rec.get("question"),
                               _field(rec, "answers", where), where,
                               {k: v for k, v in meta.items() if v is not None}))
    return _write("docvqa", samples, src, out_uri)


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
    for index, rec in enumerate(_records(_load_json(src), src, None)):
        where = f"{src} record {index + 1}"
        image = _image_ref(_field(rec, "imgname", where), where, image_root, out_uri)
        samples.append(_sample("chartqa", _row_id(f"{stem}-{index}", where, seen), image,
                               _field(rec, "query", where), [_field(rec, "label", where)],
                               where, {"image_id": rec["imgname"], "source": stem}))
    return _write("chartqa", samples, src, out_uri)


def convert_gqa(src: str, out_uri: str, image_root: str | None = None) -> int:
    """GQA questions JSON (an object: question id -> ``{imageId, question, answer}``).

    Images are ``{imageId}.jpg`` under ``image_root``; scored by exact match.
    """
    data = _load_json(src)
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected a JSON object of question id -> record, got "
                         f"{type(data).__name__}")
    root, seen, samples = _root(src, image_root), {}, []
    for qid, rec in data.items():
        where = f"{src} question {qid}"
        image_id = _field(rec, "imageId", where)
        image = _image_ref(f"{image_id}.jpg", where, root, out_uri)
        samples.append(_sample("gqa", _row_id(qid, where, seen), image, rec.get("question"),
                               [_field(rec, "answer", where)], where,
                               {"question_id": qid, "image_id": image_id}))
    return _write("gqa", samples, src, out_uri)


def _yes_no_label(value: Any, where: str) -> str:
    label = str(value).strip().lower().rstrip(".")
    if label not in ("yes", "no"):
        raise ValueError(f"{where}: label {value!r}; expected 'yes' or 'no'")
    return label


def convert_pope(src: str, out_uri: str, image_root: str | None = None) -> int:
    """POPE JSON lines (``{question_id, image, text, label}``), one file or a folder of them.

    The category comes from the file name (``coco_pope_adversarial.json`` -> ``adversarial``);
    ids are ``{category}-{question_id}`` so the three POPE files fit in one manifest.
    """
    files = [f for f in storage.list_files(src) if f.endswith((".json", ".jsonl"))]
    if not files:
        raise ValueError(f"{src}: no POPE .json/.jsonl files found")
    seen, samples = {}, []
    for path in files:
        stem = posixpath.splitext(posixpath.basename(path))[0]
        category = stem.split("pope_", 1)[-1]
        root = image_root if image_root is not None else storage.parent(path)
        for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON: {exc}") from exc
            qid = _field(rec, "question_id", where)
            label = _yes_no_label(_field(rec, "label", where), where)
            image = _image_ref(_field(rec, "image", where), where, root, out_uri)
            samples.append(_sample(
                "pope", _row_id(f"{category}-{qid}", where, seen), image,
                _field(rec, "text", where), [label], where,
                {"question_id": qid, "image_id": rec["image"], "category": category,
                 "label": label}))
    return _write("pope", samples, src, out_uri)


def _mme_pairs(files: list[str], base: str) -> list[tuple[str, str, str]]:
    """(category, questions txt, image) for each MME question file under ``base``.

    Layouts: ``<category>/questions_answers_YN/x.txt`` with ``<category>/images/x.png``, and
    the flat ``<category>/x.txt`` next to ``<category>/x.png``.
    """
    names = set(files)
    pairs = []
    for path in files:
        rel = path[len(base):].strip("/").split("/")
        if not path.endswith(".txt") or len(rel) not in (2, 3):
            continue
        if len(rel) == 3 and rel[1] != "questions_answers_YN":
            continue
        folder = storage.join(base, rel[0], "images") if len(rel) == 3 else storage.join(
            base, rel[0])
        stem = posixpath.splitext(rel[-1])[0]
        image = next((storage.join(folder, stem + s) for s in IMAGE_SUFFIXES
                      if storage.join(folder, stem + s) in names), None)
        if image is None:
            if len(rel) == 3:
                raise ValueError(f"{path}: no image {stem}{{{','.join(IMAGE_SUFFIXES)}}} in "
                                 f"{folder}")
            continue  # a flat .txt without an image is not a question file (e.g. a readme)
        pairs.append((rel[0], path, image))
    return pairs


def convert_mme(src: str, out_uri: str, image_root: str | None = None) -> int:
    """MME: ``src`` is the release folder, one sub-folder per category.

    Each question file holds lines ``question<TAB>answer`` (Yes/No; two per image). The
    images live next to their questions, so ``image_root`` must be None. Ids are
    ``{category}-{image stem}-{line}``.
    """
    if image_root is not None:
        raise ValueError(f"image_root={image_root!r}: MME keeps images next to the questions; "
                         "expected None")
    base = src.rstrip("/")
    if not storage.is_remote(base):
        base = os.path.abspath(base)
    pairs = _mme_pairs(storage.list_files(base), base)
    if not pairs:
        raise ValueError(f"{src}: no MME question files found; expected <category>/"
                         "questions_answers_YN/*.txt or <category>/*.txt next to the images")
    seen, samples = {}, []
    for category, path, image_path in pairs:
        image_id = posixpath.basename(image_path)
        image = _image_ref(image_path, path, base, out_uri)
        stem = posixpath.splitext(image_id)[0]
        for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            question, sep, answer = line.lstrip("\ufeff").rstrip("\r\n").rpartition("\t")
            if not sep:
                raise ValueError(f"{where}: expected 'question<TAB>answer', got {line!r}")
            label = _yes_no_label(answer, where)
            samples.append(_sample(
                "mme", _row_id(f"{category}-{stem}-{number}", where, seen), image, question,
                [label], where, {"category": category, "image_id": image_id, "label": label}))
    return _write("mme", samples, src, out_uri)


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
        samples.append(_sample("easyvqa", _row_id(f"easyvqa-{split}-{index}", where, seen),
                               os.path.abspath(paths[image_id]), texts[index], [answers[index]],
                               where, {"split": split, "image_id": image_id}))
    return _write("easyvqa", samples, f"easy-VQA {split}", out_uri)


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

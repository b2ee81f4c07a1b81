"""Converters of the yes/no benchmarks, POPE and MME (scored per sample with ``exact_match``
on "yes"/"no"; their ``meta`` carries what :func:`mova.metrics.pope_scores` and
:func:`mova.metrics.mme_scores` need)."""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from pipelines.common import storage
from pipelines.data.benchmark_format import (
    IMAGE_SUFFIXES,
    field,
    make_sample,
    write,
)
from pipelines.data.convert import _image_ref, _row_id


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
            qid = field(rec, "question_id", where)
            label = _yes_no_label(field(rec, "label", where), where)
            image = _image_ref(field(rec, "image", where), where, root, out_uri)
            samples.append(make_sample(
                "pope", _row_id(f"{category}-{qid}", where, seen), image,
                field(rec, "text", where), [label], where,
                {"question_id": qid, "image_id": rec["image"], "category": category,
                 "label": label}))
    return write("pope", samples, src, out_uri)


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
            samples.append(make_sample(
                "mme", _row_id(f"{category}-{stem}-{number}", where, seen), image, question,
                [label], where, {"category": category, "image_id": image_id, "label": label}))
    return write("mme", samples, src, out_uri)

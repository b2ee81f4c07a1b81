"""Manifests: read, validate (reporting every bad row), load and write sample records.

A manifest is JSON-lines (``.jsonl``/``.json``) or Parquet (``.parquet``), local or ``s3://``,
with one :class:`~pipelines.common.manifests.schema.Sample` per line or row. Validation
collects every problem with its line number and field, so a bad data set is fixed in one
pass, not one error per run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mova.conversation import HUMAN, validate_turns
from mova.experts.registry import DEFAULT_POOL, expert_names
from mova.images import ImageError, load_image
from mova.metrics import METRICS
from mova.tokenizers import IMAGE_TOKEN
from pipelines.common import storage
from pipelines.common.manifests.rows import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    ManifestError,
    RowError,
    read_rows,
    write_manifest,
)
from pipelines.common.manifests.schema import FIELDS, KINDS, Sample

__all__ = ["ManifestError", "RowError", "ValidationReport", "check_row", "load_manifest",
           "read_rows", "resolve_image", "validate_manifest", "validate_row", "write_manifest"]

logger = logging.getLogger(__name__)

IMAGE_CHECK_THREADS = 8

@dataclass
class ValidationReport:
    """The valid samples, every row error, and the number of rows read."""

    samples: list[Sample]
    errors: list[RowError]
    total: int

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def bad_rows(self) -> int:
        return len({e.line for e in self.errors})

    def format(self, limit: int = 50) -> str:
        """One line per error (the first ``limit``), then how many were left out."""
        lines = [e.format() for e in self.errors[:limit]]
        if len(self.errors) > limit:
            lines.append(f"... and {len(self.errors) - limit} more error(s)")
        return "\n".join(lines)


def resolve_image(manifest_uri: str, image: str) -> str:
    """The image's full path or URI: relative paths are relative to the manifest file's folder
    (for a manifest that is a folder of parts, to that folder)."""
    if storage.is_remote(image) or os.path.isabs(image):
        return image
    is_file = str(manifest_uri).lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    return storage.join(storage.parent(manifest_uri) if is_file else manifest_uri, image)


def _resolve_pool(pool: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(DEFAULT_POOL if pool is None else pool)
    unknown = [n for n in names if n not in expert_names()]
    if unknown:
        raise ValueError(f"pool: unknown expert(s) {unknown}; registered: {expert_names()}")
    return names


def _check_image_file(resolved: str) -> str | None:
    """None if the image exists and decodes, else the reason. S3 outages propagate."""
    try:
        data = storage.read_bytes(resolved)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return f"image file not found: {resolved}"
    try:
        load_image(data)
    except ImageError as exc:
        return f"{resolved}: {exc}"
    return None


def _check_images(resolved: Iterable[str]) -> dict[str, str | None]:
    unique = sorted(set(resolved))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=min(IMAGE_CHECK_THREADS, len(unique))) as pool:
        return dict(zip(unique, pool.map(_check_image_file, unique), strict=True))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_experts(experts: Any, pool: tuple[str, ...]) -> list[str]:
    if experts is None:
        return []
    if not _is_str_list(experts):
        return [f"expected null or a list of expert names, got {experts!r}"]
    problems = []
    for name in experts:
        if name not in expert_names():
            problems.append(f"unknown expert {name!r}; pool: {list(pool)}")
        elif name not in pool:
            problems.append(f"expert {name!r} is not in the pool {list(pool)}")
    duplicates = sorted({n for n in experts if experts.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate expert name(s) {duplicates}")
    return problems


def _check_placeholder(turns: list[dict], has_image: bool) -> str | None:
    """The conversation must hold at most one ``<image>``, in a human turn, only with an image."""
    counts = [t["value"].count(IMAGE_TOKEN) for t in turns]
    if not has_image and sum(counts):
        return f"{IMAGE_TOKEN!r} appears but the sample has no image (image is null)"
    if sum(counts) > 1:
        return f"{IMAGE_TOKEN!r} appears {sum(counts)} times; expected at most once"
    if sum(counts) == 1 and turns[counts.index(1)]["from"] != HUMAN:
        return f"turn {counts.index(1)}: {IMAGE_TOKEN!r} must be in a human turn"
    return None


Problems = list[tuple[str, str]]  # (field, message)


def _id_problems(row: dict, ident: str | None, line: int,
                 seen_ids: dict[str, int] | None) -> Problems:
    problems = [(key, f"unknown key; expected keys among {list(FIELDS)}")
                for key in sorted(set(row) - set(FIELDS))]
    if ident is None:
        problems.append(("id", f"expected a non-empty string, got {row.get('id')!r}"))
    elif seen_ids is not None:
        if ident in seen_ids:
            problems.append(("id", f"duplicate id {ident!r} (first on line {seen_ids[ident]})"))
        else:
            seen_ids[ident] = line
    return problems


def _image_problems(image: Any, manifest_uri: str,
                    image_status: dict[str, str | None] | None) -> Problems:
    if image is not None and (not isinstance(image, str) or not image):
        return [("image", f"expected null or a non-empty path/URI string, got {image!r}")]
    if image is not None and image_status is not None:
        problem = image_status.get(resolve_image(manifest_uri, image))
        if problem:
            return [("image", problem)]
    return []


def _turn_problems(row: dict) -> tuple[list[dict], Problems]:
    try:
        turns = validate_turns(row.get("conversations"))
    except ValueError as exc:
        return [], [("conversations", str(exc))]
    problem = _check_placeholder(turns, row.get("image") is not None)
    return turns, [("conversations", problem)] if problem else []


def _field_problems(row: dict, pool: tuple[str, ...]) -> Problems:
    problems = [("experts", p) for p in _check_experts(row.get("experts"), pool)]
    kind = "answer" if row.get("kind") is None else row.get("kind")
    if kind not in KINDS:
        problems.append(("kind", f"expected one of {list(KINDS)}, got {kind!r}"))
    if row.get("domain") is not None and not isinstance(row.get("domain"), str):
        problems.append(("domain", f"expected null or a string, got {row.get('domain')!r}"))
    if row.get("answers") is not None and not _is_str_list(row.get("answers")):
        problems.append(("answers", "expected null or a list of strings, got "
                                    f"{row.get('answers')!r}"))
    metric = row.get("metric")
    if metric is not None and metric not in METRICS:
        problems.append(("metric", f"unknown metric {metric!r}; expected null or one of "
                                   f"{sorted(METRICS)}"))
    if row.get("meta") is not None and not isinstance(row.get("meta"), dict):
        problems.append(("meta", f"expected null or an object, got "
                                 f"{type(row.get('meta')).__name__}"))
    return problems


def _check_row(
    row: dict | RowError,
    line: int,
    pool: tuple[str, ...],
    manifest_uri: str,
    image_status: dict[str, str | None] | None,
    seen_ids: dict[str, int] | None,
) -> tuple[Sample | None, list[RowError]]:
    """Validate one row; returns the sample (None if any error) and the errors."""
    if isinstance(row, RowError):
        return None, [row]
    ident = row.get("id") if isinstance(row.get("id"), str) and row.get("id") else None
    turns, turn_problems = _turn_problems(row)
    problems = (_id_problems(row, ident, line, seen_ids)
                + _image_problems(row.get("image"), manifest_uri, image_status)
                + turn_problems + _field_problems(row, pool))
    if problems:
        return None, [RowError(line, ident, field, message) for field, message in problems]
    sample = Sample(
        id=ident, image=row.get("image"), conversations=turns, experts=row.get("experts"),
        kind=row.get("kind") or "answer", domain=row.get("domain"), answers=row.get("answers"),
        metric=row.get("metric"), meta=row.get("meta") or {},
    )
    return sample, []


def check_row(row: dict | RowError, line: int, pool: Sequence[str] | None, manifest_uri: str,
              *, seen_ids: dict[str, int] | None = None,
              check_image: bool = False) -> tuple[Sample | None, list[RowError]]:
    """One parsed row as a :class:`Sample` (None when it has errors) and its errors; with
    ``check_image`` its image must exist and decode (else images are not opened).
    ``seen_ids`` (id -> first line) enables the duplicate-id check."""
    status = None
    image = row.get("image") if isinstance(row, dict) else None
    if check_image and isinstance(image, str) and image:
        resolved = resolve_image(manifest_uri, image)
        status = {resolved: _check_image_file(resolved)}
    return _check_row(row, line, _resolve_pool(pool), manifest_uri, status, seen_ids)


def validate_row(
    row: dict | RowError,
    line: int,
    pool: Sequence[str] | None,
    manifest_uri: str,
    check_image: bool,
    *,
    seen_ids: dict[str, int] | None = None,
) -> list[RowError]:
    """Every problem with one row (empty when valid).

    ``seen_ids`` (id -> first line) enables the duplicate-id check across rows; with
    ``check_image`` the image must exist (relative to the manifest's folder, absolute or
    ``s3://``) and decode.
    """
    return check_row(row, line, pool, manifest_uri, seen_ids=seen_ids,
                     check_image=check_image)[1]


def validate_manifest(
    uri: str, pool: Sequence[str] | None = None, check_images: bool = True
) -> ValidationReport:
    """Check every row of a manifest and report all problems (not just the first)."""
    names = _resolve_pool(pool)
    rows = read_rows(uri)
    status = None
    if check_images:
        images = [resolve_image(uri, r["image"]) for _, r in rows
                  if isinstance(r, dict) and isinstance(r.get("image"), str) and r["image"]]
        status = _check_images(images)
    seen: dict[str, int] = {}
    samples: list[Sample] = []
    errors: list[RowError] = []
    for line, row in rows:
        sample, row_errors = _check_row(row, line, names, uri, status, seen)
        errors += row_errors
        if sample is not None:
            samples.append(sample)
    logger.info("validated %s: %d rows, %d ok, %d error(s)", uri, len(rows), len(samples),
                len(errors))
    return ValidationReport(samples=samples, errors=errors, total=len(rows))


def load_manifest(
    uri: str,
    pool: Sequence[str] | None = None,
    check_images: bool = True,
    skip_bad_rows: bool = False,
    report_uri: str | None = None,
) -> list[Sample]:
    """The valid samples of a manifest.

    With errors, raises :class:`ManifestError` listing them, unless ``skip_bad_rows``: then
    the good rows are returned and, given ``report_uri``, the errors of the skipped rows are
    written there as JSON lines (``line``, ``id``, ``field``, ``message``).
    """
    report = validate_manifest(uri, pool=pool, check_images=check_images)
    if report.errors and not skip_bad_rows:
        raise ManifestError(
            f"manifest {uri}: {report.bad_rows} bad row(s) of {report.total}, "
            f"{len(report.errors)} error(s):\n{report.format()}"
        )
    if report.errors:
        logger.warning("manifest %s: skipping %d bad row(s) of %d", uri, report.bad_rows,
                       report.total)
    if report_uri is not None:
        text = "".join(
            json.dumps({"line": e.line, "id": e.id, "field": e.field, "message": e.message},
                       ensure_ascii=False) + "\n"
            for e in report.errors
        )
        storage.write_text_atomic(report_uri, text)
        logger.info("wrote the bad-row report to %s", report_uri)
    return report.samples

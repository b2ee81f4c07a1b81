"""One streaming pass over a manifest: its chunks (byte ranges of whole rows), row counts and
bad rows, computed by Ray tasks; the driver keeps only this small summary.

A manifest is a JSON-lines or Parquet file, or a folder of them (read in name order; a folder
written by a mova job carries a ``_SUCCESS`` file listing its parts, and only those are read).
Big JSON-lines files are split into byte ranges that tasks scan in parallel; each range yields
chunks of at most ``chunk_rows`` rows that later readers fetch with one ranged read. Every row
is parsed and validated once here, so a bad row is named by file and line before any real work
starts; with ``skip_bad_rows`` the readers drop the same rows again.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict

import pyarrow.parquet as pq
import ray

from pipelines.common import storage
from pipelines.common.manifests import scan_cache
from pipelines.common.manifests.chunks import Chunk, ManifestScan, RangeResult
from pipelines.common.manifests.ids import duplicates_across, mark_duplicates
from pipelines.common.manifests.rows import (
    ManifestError,
    RowError,
    format_of,
    manifest_files,
    parquet_row,
    parse_line,
)
from pipelines.common.manifests.validate import check_row

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024
RANGE_BYTES = 64 << 20  # one scan task reads at most this much of a JSON-lines file
MAX_ERRORS = 50  # errors kept per task (their total is always counted)


def scan_tasks(files: Sequence[str], range_bytes: int = RANGE_BYTES) -> list[dict]:
    """One task description per byte range of each JSON-lines file, and per run of row groups
    of a Parquet file (``start``/``end``: group indices; about ``range_bytes`` of data each)."""
    tasks = []
    for path in files:
        fmt = format_of(path)
        if fmt == "parquet":
            tasks += _parquet_tasks(path, range_bytes)
            continue
        fs, fpath = storage.filesystem(path)
        size = fs.get_file_info(fpath).size or 0
        for start in range(0, max(size, 1), range_bytes):
            tasks.append({"path": path, "fmt": fmt, "start": start,
                          "end": min(start + range_bytes, size)})
    return tasks


def _parquet_tasks(path: str, range_bytes: int) -> list[dict]:
    fs, fpath = storage.filesystem(path)
    with fs.open_input_file(fpath) as handle:
        meta = pq.ParquetFile(handle).metadata
    tasks, start, size = [], 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if size >= range_bytes or group == meta.num_row_groups - 1:
            tasks.append({"path": path, "fmt": "parquet", "start": start, "end": group + 1})
            start, size = group + 1, 0
    return tasks or [{"path": path, "fmt": "parquet", "start": 0, "end": 0}]


def _lines_in_range(path: str, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, end offset, line) for every line that starts in ``[start, end)``."""
    fs, fpath = storage.filesystem(path)
    with fs.open_input_file(fpath) as handle:
        size = handle.size()
        pos = start
        if start > 0:  # a line starting before the range belongs to the previous one
            handle.seek(start - 1)
            carry = b""
            while True:
                block = handle.read(1 << 16)
                if not block:
                    return
                cut = block.find(b"\n")
                if cut >= 0:
                    pos = start - 1 + len(carry) + cut + 1
                    break
                carry += block
        handle.seek(pos)
        buffer = b""
        offset = pos
        while offset < end and offset < size:
            block = handle.read(1 << 20)
            if not block:
                if buffer:
                    yield offset, offset + len(buffer), buffer
                return
            buffer += block
            while True:
                cut = buffer.find(b"\n")
                if cut < 0:
                    break
                line, buffer = buffer[:cut], buffer[cut + 1:]
                yield offset, offset + cut + 1, line
                offset += cut + 1
                if offset >= end:
                    return


def scan_range(task: dict, pool: Sequence[str] | None, chunk_rows: int = CHUNK_ROWS,
               report: str | None = None, check_images: bool = False) -> dict:
    """Scan one task's rows: chunk boundaries, counts, validation errors (a Ray task body).
    With ``report``, every error also goes to a JSON-lines part file in that folder; with
    ``check_images`` every row's image must exist and decode."""
    path, fmt = task["path"], task["fmt"]
    out = RangeResult()
    seen: dict[str, int] = {}
    every: list[dict] = []
    try:
        rows = (_parquet_rows(path, task["start"], task["end"]) if fmt == "parquet"
                else _jsonl_rows(path, task["start"], task["end"]))
        current: dict | None = None
        for group, line, start, end, raw in rows:
            out.lines = line
            if raw is None:  # a blank line: counted for line numbers only
                continue
            # a Parquet chunk is one whole row group (read once, never decoded in part)
            full = current is not None and fmt != "parquet" and current["rows"] >= chunk_rows
            if current is None or full or current["group"] != group:
                if current is not None:
                    out.chunks.append(current)
                current = {"path": path, "fmt": fmt, "start": start, "end": end, "line": line,
                           "rows": 0, "valid": 0, "group": group}
            current["rows"] += 1
            current["end"] = end
            sample, errors = check_row(raw, line, pool, path, check_image=check_images)
            if sample is not None:
                if sample.id in seen:
                    out.duplicates.append({"id": sample.id, "line": line,
                                           "first_line": seen[sample.id]})
                else:
                    seen[sample.id] = line
            out.rows += 1
            if errors:
                out.error_count += len(errors)
                out.errors += [asdict(e) for e in errors][:MAX_ERRORS - len(out.errors)]
                if report:
                    every += [{"file": path, "offset": start, **asdict(e)} for e in errors]
            else:
                current["valid"] += 1
                out.valid += 1
        if current is not None:
            out.chunks.append(current)
    except OSError as exc:
        raise ManifestError(f"manifest {path} cannot be read: {exc}") from exc
    for chunk in out.chunks:
        chunk.pop("group")
    result = asdict(out)
    if every:  # lines relative to the range until shift_report_lines makes them file-wide
        result["report_part"] = write_report_part(report, "rows", every)
    return result


def shift_report_lines(part: str, lines_before: int) -> None:
    """Make a report part's line numbers file-wide (a Ray task body for ranges after the
    first of a file, whose scan could not know how many lines came before)."""
    records = [json.loads(line) for line in storage.read_text(part).splitlines() if line]
    for record in records:
        record["line"] += lines_before
    storage.write_text_atomic(part, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                            for r in records))


def write_report_part(folder: str, kind: str, records: list[dict]) -> str:
    """One JSON-lines part of a job's bad-row report, written atomically by a worker."""
    path = storage.join(folder, f"{kind}-{uuid.uuid4().hex}.jsonl")
    storage.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                            for r in records))
    return path


def _jsonl_rows(path: str, start: int, end: int):
    for number, (first, last, line) in enumerate(_lines_in_range(path, start, end), start=1):
        text = line.strip()
        yield 0, number, first, last, (parse_line(text, number) if text else None)


def _parquet_rows(path: str, first_group: int, end_group: int):
    """Rows of row groups ``[first_group, end_group)`` (numbered from 1 within the task;
    ``start``/``end``: their file-wide row range), streamed a batch at a time."""
    fs, fpath = storage.filesystem(path)
    with fs.open_input_file(fpath) as handle:
        reader = pq.ParquetFile(handle)
        row = sum(reader.metadata.row_group(g).num_rows for g in range(first_group))
        number = 0
        for group in range(first_group, end_group):
            for batch in reader.iter_batches(batch_size=CHUNK_ROWS, row_groups=[group]):
                for record in batch.to_pylist():
                    number += 1
                    row += 1
                    yield group, number, row - 1, row, parquet_row(record, row)


def scan_manifest(uri: str, *, pool: Sequence[str] | None = None,
                  chunk_rows: int = CHUNK_ROWS, range_bytes: int = RANGE_BYTES,
                  report: str | None = None, reuse: bool = True,
                  check_images: bool = False) -> ManifestScan:
    """Scan a manifest with Ray tasks (Ray must be up); the driver gets chunks and counts.
    With ``report`` (a folder), the tasks also write every bad row there; ``check_images``:
    every image must exist and decode. ``reuse``: take an earlier scan of the same, unchanged
    files on this node (:mod:`.scan_cache`)."""
    files = manifest_files(uri)
    reuse = reuse and not check_images  # kept scans never opened the images
    key = scan_cache.scan_key(files, pool, chunk_rows, range_bytes) if reuse else None
    kept = scan_cache.load(key, uri)
    if kept is not None and not (report and kept.error_count):
        return kept
    scan = _scan(uri, files, pool, chunk_rows, range_bytes, report, check_images)
    scan_cache.save(key, scan)
    return scan


def _scan(uri: str, files: list[str], pool: Sequence[str] | None, chunk_rows: int,
          range_bytes: int, report: str | None, check_images: bool = False) -> ManifestScan:
    tasks = scan_tasks(files, range_bytes)
    remote = ray.remote(num_cpus=1)(scan_range)
    results = ray.get([remote.remote(t, list(pool) if pool else None, chunk_rows, report,
                                     check_images) for t in tasks])
    scan = merge_ranges(uri, tasks, results, report)
    if len(tasks) > 1:  # ids repeated across ranges (merge_ranges did a single range's)
        found = duplicates_across([c.to_dict() for c in scan.chunks], files, pool)
        records = mark_duplicates(scan, found, several_files=len(files) > 1)
        if records and report:
            write_report_part(report, "ids", records)
    shift = ray.remote(num_cpus=1)(shift_report_lines)
    ray.get([shift.remote(r["report_part"], before)
             for r, before in zip(results, _lines_before(tasks, results), strict=True)
             if r.get("report_part") and before])
    return scan


def _lines_before(tasks: list[dict], results: list[dict]) -> list[int]:
    """For each range, how many lines of its file come before it."""
    out, base = [], {}
    for task, result in zip(tasks, results, strict=True):
        out.append(base.get(task["path"], 0))
        base[task["path"]] = out[-1] + result["lines"]
    return out


def merge_ranges(uri: str, tasks: list[dict], results: list[dict],
                 report: str | None = None) -> ManifestScan:
    """Put the ranges' chunks in order with file-wide line numbers."""
    scan = ManifestScan(uri=uri, chunks=[])
    several = len({t["path"] for t in tasks}) > 1 or any(t["path"] != uri for t in tasks)
    for task, result, offset in zip(tasks, results, _lines_before(tasks, results), strict=True):
        for chunk in result["chunks"]:
            scan.chunks.append(Chunk(**{**chunk, "line": chunk["line"] + offset}))
        for error in result["errors"]:
            if len(scan.errors) < MAX_ERRORS:
                where = error["line"] + offset
                message = (f"{task['path']}: {error['message']}" if several
                           else error["message"])
                scan.errors.append(RowError(where, error["id"], error["field"], message))
        scan.rows += result["rows"]
        scan.valid += result["valid"]
        scan.error_count += result["error_count"]
    if len(tasks) == 1:  # a single range found its own duplicates (several: scan_manifest)
        path = tasks[0]["path"]
        records = mark_duplicates(scan, [{**d, "file": path, "first_file": path}
                                         for d in results[0]["duplicates"]], several)
        if records and report:
            write_report_part(report, "ids", records)
    log.info("scanned %s: %d rows, %d valid, %d error(s), %d chunk(s)", uri, scan.rows,
             scan.valid, scan.error_count, len(scan.chunks))
    return scan

"""Manifest rows as a Ray Data stream: each chunk of a scan is fetched with one ranged read by a
Ray task, so neither the driver nor any single worker holds the whole manifest.

Rows travel as ``{"file", "line", "sample"}`` with the sample as JSON text (a fixed Arrow
schema whatever the rows hold); :func:`samples_of` turns a batch back into
:class:`~pipelines.common.manifests.schema.Sample` objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from pipelines.common import storage
from pipelines.common.manifests.rows import ManifestError, RowError, parquet_row, parse_line
from pipelines.common.manifests.schema import Sample
from pipelines.common.manifests.validate import check_row

MAX_BLOCKS = 200  # input blocks of a manifest dataset (each a few chunks)
BATCH_ROWS = 1024  # rows of a Parquet row group decoded at a time


def chunk_lines(chunk: dict) -> Iterator[tuple[int, dict | RowError]]:
    """(line, parsed row) of every row of a chunk, fetched with one ranged read."""
    path = chunk["path"]
    if chunk["fmt"] == "parquet":
        yield from _row_group_lines(chunk)
        return
    try:
        data = storage.read_range(path, chunk["start"], chunk["end"] - chunk["start"])
    except OSError as exc:
        raise ManifestError(f"manifest {path} cannot be read: {exc}") from exc
    pieces = data.split(b"\n")
    if data.endswith(b"\n"):
        pieces.pop()
    for i, raw in enumerate(pieces):  # blank lines inside a chunk keep their numbers
        text = raw.decode("utf-8", errors="replace").strip()
        if text:
            yield chunk["line"] + i, parse_line(text, chunk["line"] + i)


def _row_group_lines(chunk: dict) -> Iterator[tuple[int, dict | RowError]]:
    """The rows of a Parquet chunk: the one row group holding rows ``[start, end)`` of the
    file, read alone and streamed a batch at a time."""
    fs, fpath = storage.filesystem(chunk["path"])
    with fs.open_input_file(fpath) as handle:
        reader = pq.ParquetFile(handle)
        first = 0
        for group in range(reader.num_row_groups):
            count = reader.metadata.row_group(group).num_rows
            if first + count > chunk["start"]:
                row = first
                for batch in reader.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                    for record in batch.to_pylist():
                        row += 1
                        if chunk["start"] < row <= chunk["end"]:
                            yield row, parquet_row(record, row)
                return
            first += count


def chunk_samples(chunk: dict, pool: Sequence[str] | None, skip_bad_rows: bool
                  ) -> list[tuple[int, Sample]]:
    """The valid samples of a chunk with their lines; a bad row is an error naming its file
    and line unless ``skip_bad_rows`` (the scan has already reported it)."""
    out: list[tuple[int, Sample]] = []
    skip = set(chunk.get("skip") or ())
    for line, row in chunk_lines(chunk):
        if chunk.get("limit") is not None and len(out) >= chunk["limit"]:
            break
        if line in skip:  # repeats an earlier row's id (pipelines.common.manifests.ids)
            if not skip_bad_rows:
                raise ManifestError(f"manifest {chunk['path']}: line {line}: duplicate id")
            continue
        sample, errors = check_row(row, line, pool, chunk["path"])
        if errors:
            if not skip_bad_rows:
                raise ManifestError(f"manifest {chunk['path']}: {errors[0].format()}")
            continue
        out.append((line, sample))
    return out


def _rows_of(batch: dict[str, np.ndarray], pool: list[str] | None,
             skip_bad_rows: bool) -> dict[str, list]:
    files, lines, samples = [], [], []
    for raw in batch["chunk"]:
        chunk = json.loads(str(raw))
        for line, sample in chunk_samples(chunk, pool, skip_bad_rows):
            files.append(chunk["path"])
            lines.append(line)
            samples.append(json.dumps(sample.to_dict(), ensure_ascii=False))
    return {"file": files, "line": lines, "sample": samples}


def manifest_dataset(scan: Any, *, pool: Sequence[str] | None = None,
                     skip_bad_rows: bool = False) -> Any:
    """A Ray Dataset of a scanned manifest's valid rows, in manifest order per chunk."""
    chunks, left = [], scan.row_limit
    for c in scan.chunks:
        if not c.valid or left == 0:
            continue
        item = c.to_dict()
        if left is not None:
            item["limit"] = min(c.valid, left)
            left -= item["limit"]
        chunks.append(json.dumps(item))
    if not chunks:
        raise ManifestError(f"manifest {scan.uri} holds no valid row")
    return (ray.data.from_items([{"chunk": c} for c in chunks],
                                override_num_blocks=min(len(chunks), MAX_BLOCKS))
            .map_batches(_rows_of, batch_size=1, num_cpus=0.5,
                         fn_kwargs={"pool": list(pool) if pool else None,
                                    "skip_bad_rows": skip_bad_rows}))


def samples_of(batch: dict[str, np.ndarray]) -> list[tuple[str, int, Sample]]:
    """(file, line, sample) of each row of a batch of :func:`manifest_dataset`."""
    return [(str(f), int(n), Sample.from_dict(json.loads(str(s))))
            for f, n, s in zip(batch["file"], batch["line"], batch["sample"], strict=True)]

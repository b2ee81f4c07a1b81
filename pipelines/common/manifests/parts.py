"""Outputs that workers write in parts: a folder of part files published by a ``_SUCCESS`` file.

Each worker writes its part atomically under a name derived from its first input row, so parts
sort in input order. The driver marks the folder ``_STARTED`` before any part is written and,
when every part is there, writes ``_SUCCESS`` listing them: the manifest readers of
``pipelines.common.manifests.scan`` read exactly those, refuse a folder that was started but never
published, and jobs refuse to overwrite either kind silently.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.common.manifests.rows import STARTED, SUCCESS


def part_name(file_index: int, line: int, suffix: str) -> str:
    """The name of a part whose first row is ``line`` of the ``file_index``-th input file."""
    return f"part-{file_index:05d}-{line:012d}{suffix}"


def write_jsonl_part(folder: str, name: str, rows: Sequence[dict]) -> str:
    path = storage.join(folder, name)
    storage.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                            for r in rows))
    return path


def write_parquet_part(folder: str, name: str, rows: Sequence[dict], schema: pa.Schema) -> str:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), buf)
    path = storage.join(folder, name)
    storage.write_bytes_atomic(path, buf.getvalue())
    return path


def begin_parts(folder: str, job: str) -> str:
    """Mark ``folder`` as being written by ``job`` (before its first part)."""
    marker = storage.join(folder, STARTED)
    storage.write_text_atomic(marker, json.dumps({"job": job, "started": time.time()}) + "\n")
    return marker


def publish_parts(folder: str, parts: Sequence[str], rows: int) -> str:
    """Write ``_SUCCESS`` (the part names in order and the row count): the output is done."""
    names = sorted(posixpath.basename(p.rstrip("/")) for p in parts)
    marker = storage.join(folder, SUCCESS)
    storage.write_text_atomic(marker, json.dumps({"parts": names, "rows": rows},
                                                 indent=1) + "\n")
    return marker


def is_published(folder: str) -> bool:
    return storage.exists(storage.join(folder, SUCCESS))

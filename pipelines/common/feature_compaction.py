"""Compaction of the feature cache's index (:mod:`pipelines.common.feature_index` describes the
layout): the fresh parts and the compacted indexes merged into one new compacted index, one
bucket in memory at a time, safe beside readers, writers and other compactions."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.common.feature_index import (
    COMPACT_PREFIX,
    INDEX_SCHEMA,
    Compacted,
    list_index,
    read_table,
)

log = logging.getLogger(__name__)

BUCKET_ENTRIES = 1 << 20  # entries per bucket file, about (memory of one compaction step)
ROW_GROUP = 4096  # entries per row group: what one lookup reads (~300 KB)
COMPACT_ATTEMPTS = 4  # starts of a compaction that others overtook


def bucket_digits(entries: int) -> int:
    """Hex digits of the hash that pick a bucket, for an index of ``entries``."""
    digits = 0
    while entries > BUCKET_ENTRIES * 16 ** digits and digits < 2:
        digits += 1
    return digits


def compact(folder: str, attempts: int = COMPACT_ATTEMPTS) -> int:
    """Merge the fresh parts and the compacted indexes of ``folder`` into one new compacted
    index (streamed: one bucket in memory at a time); returns its entries. Safe beside
    readers, writers and other compactions: the new index is complete before anything it
    merged is deleted, fresh parts written meanwhile stay, and a compaction whose inputs
    another deleted under it starts again (``attempts`` times in all, then leaves the index
    whole but not merged into one)."""
    for attempt in range(1, attempts + 1):
        try:
            return _compact_once(folder)
        except FileNotFoundError as exc:
            log.info("compaction of %s: another compaction merged an input under it (%s); "
                     "starting again (attempt %d of %d)", folder, exc, attempt, attempts)
    compacts, _ = list_index(folder)
    log.warning("compaction of %s gave way to concurrent compactions %d times; its entries "
                "stay in %d compacted indexes and fresh parts", folder, attempts, len(compacts))
    return sum(c.entries for c in compacts)


def _compact_once(folder: str) -> int:
    olds, fresh = list_index(folder)
    if not fresh and len(olds) <= 1:
        return olds[0].entries if olds else 0
    digits = bucket_digits(sum(c.entries for c in olds) + sum(_rows(p) for p in fresh))
    name = f"{COMPACT_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex}"
    target = storage.join(folder, name)
    staging = storage.join(folder, f"_tmp-{name}")  # fresh entries split by bucket
    try:
        if digits:
            _split(fresh, digits, staging)
        total, written = 0, []
        for bucket in _buckets(digits):
            pieces = [p for old in olds for p in _old_bucket(old, bucket, digits)]
            pieces += _staged(staging, bucket) if digits else fresh
            table = _merged(pieces, bucket)
            if table.num_rows:
                buf = io.BytesIO()
                pq.write_table(table, buf, row_group_size=ROW_GROUP)
                storage.write_bytes_atomic(storage.join(target, f"b-{bucket}.parquet"),
                                           buf.getvalue())
                total += table.num_rows
                written.append(bucket)
        storage.write_text_atomic(f"{target}.json", json.dumps(
            {"digits": digits, "entries": total, "buckets": written}))
    except BaseException:
        storage.delete(target, missing_ok=True)
        raise
    finally:
        storage.delete(staging, missing_ok=True)
    for path in fresh:
        storage.delete(path, missing_ok=True)
    for old in olds:
        if old.marker is not None:
            storage.delete(old.marker, missing_ok=True)
        storage.delete(old.folder, missing_ok=True)
    return total


def _rows(path: str) -> int:
    fs, fpath = storage.filesystem(path)
    with fs.open_input_file(fpath) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _buckets(digits: int) -> list[str]:
    return [f"{i:0{digits}x}" for i in range(16 ** digits)] if digits else [""]


def _split(fresh: list[str], digits: int, staging: str) -> None:
    """Write the fresh parts' entries, streamed in part-name order, into one folder per
    bucket (``staging/b=<bucket>/``), keeping their order."""
    fs, base = storage.filesystem(staging)

    def batches():
        for part in fresh:
            table = read_table(part)
            bucket = pc.utf8_slice_codeunits(table.column("image_hash"), 0, digits)
            yield from table.append_column("b", bucket).to_batches()

    schema = INDEX_SCHEMA.append(pa.field("b", pa.string()))
    ds.write_dataset(batches(), base, schema=schema, format="parquet", filesystem=fs,
                     partitioning=["b"], partitioning_flavor="hive",
                     basename_template="part-{i}.parquet", preserve_order=True,
                     existing_data_behavior="overwrite_or_ignore")


def _staged(staging: str, bucket: str) -> list[str]:
    folder = storage.join(staging, f"b={bucket}")
    if not storage.exists(folder):
        return []
    return sorted(storage.list_files(folder, suffix=".parquet"),
                  key=lambda p: int(p.rsplit("-", 1)[-1].split(".")[0]))


def _merged(paths: list[str], bucket: str) -> pa.Table:
    """One bucket's entries from ``paths`` (earlier files win a repeated hash), sorted."""
    tables = []
    for path in paths:
        table = read_table(path).select(INDEX_SCHEMA.names)
        tables.append(table.filter(pc.starts_with(pc.field("image_hash"), bucket))
                      if bucket else table)
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    hashes = table.column("image_hash").to_numpy(zero_copy_only=False)
    _, first = np.unique(hashes, return_index=True)
    return table.take(pa.array(np.sort(first))).sort_by("image_hash")


def _old_bucket(old: Compacted, bucket: str, digits: int) -> list[str]:
    """The files of an old index that may hold ``bucket``'s hashes (its digit count may
    differ from the new one's)."""
    prefix = bucket[:old.digits]
    if old.digits <= digits:
        heads = [prefix]
    else:
        heads = [prefix + tail for tail in _buckets(old.digits - digits)]
    paths = [old.bucket_file(head) for head in heads]
    return [p for p in paths if p is not None and (old.buckets is not None
                                                   or storage.exists(p))]

"""The feature cache's index: where each image's features live, looked up at flat memory.

Writers add one small *fresh* part per shard (``index/<id>.parquet``). Compaction merges the
fresh parts and the previous compacted index into a new one, ``index/compact-<id>/``: entries
split into buckets by the first hex digits of the image hash (1, 16 or 256 buckets: at most
about :data:`BUCKET_ENTRIES` entries each), each bucket one Parquet file sorted by hash in row
groups of :data:`ROW_GROUP` entries, and ``_SUCCESS`` (written last) saying how many.

A reader never loads a whole compacted index: a lookup reads the footer of its bucket (the
row groups' hash ranges) and the one row group that can hold the hash, and keeps what it read
in a least-recently-used cache of bounded size. So a reader's memory is flat in the number of
cached images, and each row group is read at most once while it stays cached. Fresh parts are
read whole when the reader opens; after a job's compaction there are none. An image cached
twice is served from the compacted entry, else from the first fresh part in name order.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipelines.common import storage

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("image_hash", pa.string()),
    ("shard", pa.string()),
    ("offset", pa.int64()),
    ("length", pa.int64()),
    ("tokens", pa.int32()),
    ("channels", pa.int32()),
    ("dtype", pa.string()),
])
COMPACT_PREFIX = "compact-"
SUCCESS = "_SUCCESS"
BUCKET_ENTRIES = 1 << 20  # entries per bucket file, about (memory of one compaction step)
ROW_GROUP = 4096  # entries per row group: what one lookup reads (~300 KB)
READER_BYTES = 32 << 20  # what a reader keeps of the row groups and footers it read


@dataclass
class Entry:
    """Where one image's features are: a span of a shard file, their shape and dtype."""

    shard: str
    offset: int
    length: int
    tokens: int
    channels: int
    dtype: str


def bucket_digits(entries: int) -> int:
    """Hex digits of the hash that pick a bucket, for an index of ``entries``."""
    digits = 0
    while entries > BUCKET_ENTRIES * 16 ** digits and digits < 2:
        digits += 1
    return digits


def _entries(table: pa.Table) -> dict[str, Entry]:
    rows = table.to_pydict()
    out: dict[str, Entry] = {}
    for i, h in enumerate(rows["image_hash"]):
        out.setdefault(h, Entry(rows["shard"][i], rows["offset"][i], rows["length"][i],
                                rows["tokens"][i], rows["channels"][i], rows["dtype"][i]))
    return out


class _Rows:
    """One row group of a compacted bucket as numpy columns (about 100 bytes an entry),
    sorted by hash, for binary search."""

    def __init__(self, table: pa.Table) -> None:
        cols = table.to_pydict()
        self.hashes = np.array([h.encode() for h in cols["image_hash"]], dtype="S64")
        self.shards, self.shard = np.unique(np.array(cols["shard"], dtype=object),
                                            return_inverse=True)
        self.offset = np.asarray(cols["offset"], np.int64)
        self.length = np.asarray(cols["length"], np.int64)
        self.tokens = np.asarray(cols["tokens"], np.int32)
        self.channels = np.asarray(cols["channels"], np.int32)
        self.dtypes, self.dtype = np.unique(np.array(cols["dtype"], dtype=object),
                                            return_inverse=True)
        self.nbytes = (self.hashes.nbytes + self.shard.nbytes + self.offset.nbytes
                       + self.length.nbytes + self.tokens.nbytes + self.channels.nbytes
                       + self.dtype.nbytes + 100 * len(self.shards))

    def get(self, image_hash: str) -> Entry | None:
        want = image_hash.encode()
        i = int(np.searchsorted(self.hashes, want))
        if i >= len(self.hashes) or self.hashes[i] != want:
            return None
        return Entry(str(self.shards[self.shard[i]]), int(self.offset[i]),
                     int(self.length[i]), int(self.tokens[i]), int(self.channels[i]),
                     str(self.dtypes[self.dtype[i]]))


def _read_table(path: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(path)))


class IndexReader:
    """Lookups in the index of one (expert, key) folder as it was when the reader opened."""

    def __init__(self, folder: str, budget: int = READER_BYTES) -> None:
        self.folder, self.budget = folder, budget
        self.fresh: dict[str, Entry] = {}
        self.compact: str | None = None
        self.digits = 0
        self.entries = 0
        self._kept: OrderedDict[tuple, tuple[int, object]] = OrderedDict()
        self._kept_bytes = 0
        self.bytes_read = 0  # index bytes fetched (footers and row groups)
        self.loads = 0  # row groups read
        self._open()

    def _open(self) -> None:
        for attempt in range(3):  # a compaction may delete what was listed
            try:
                compact, fresh = list_index(self.folder)
                self.fresh = {}
                for part in fresh:
                    for h, e in _entries(_read_table(part)).items():
                        self.fresh.setdefault(h, e)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        if compact is not None:
            meta = json.loads(storage.read_text(storage.join(compact, SUCCESS)))
            self.compact, self.digits, self.entries = compact, meta["digits"], meta["entries"]

    def find(self, hashes: Sequence[str]) -> list[Entry | None]:
        """Each hash's entry, or None where it is not cached."""
        return [self._find(h) for h in hashes]

    def _find(self, image_hash: str) -> Entry | None:
        if self.compact is not None:
            found = self._compacted(image_hash)
            if found is not None:
                return found
        return self.fresh.get(image_hash)

    def _compacted(self, image_hash: str) -> Entry | None:
        path = storage.join(self.compact, f"b-{image_hash[:self.digits]}.parquet")
        lows = self._keep(("footer", path), lambda: self._footer(path))
        if lows is None:
            return None
        group = int(np.searchsorted(lows, image_hash.encode(), side="right")) - 1
        if group < 0:
            return None
        entries = self._keep(("group", path, group), lambda: self._row_group(path, group))
        return entries.get(image_hash)

    def _footer(self, path: str) -> tuple[object, int]:
        """The first hash of each row group (sorted files: enough to pick the group)."""
        if not storage.exists(path):
            return None, 0
        fs, fpath = storage.filesystem(path)
        with fs.open_input_file(fpath) as handle:
            meta = pq.ParquetFile(handle).metadata
            self.bytes_read += meta.serialized_size
        lows = np.array([meta.row_group(g).column(0).statistics.min.encode()
                         for g in range(meta.num_row_groups)], dtype="S64")
        return lows, lows.nbytes + 256

    def _row_group(self, path: str, group: int) -> tuple[object, int]:
        fs, fpath = storage.filesystem(path)
        with fs.open_input_file(fpath) as handle:
            reader = pq.ParquetFile(handle)
            table = reader.read_row_group(group)
            self.bytes_read += reader.metadata.row_group(group).total_byte_size
        self.loads += 1
        rows = _Rows(table)
        return rows, rows.nbytes

    def _keep(self, key: tuple, load) -> object:
        """A value kept by its key (least recently used dropped beyond the budget)."""
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key][1]
        value, size = load()
        self._kept[key] = (size, value)
        self._kept_bytes += size
        while self._kept_bytes > self.budget and len(self._kept) > 1:
            _, (dropped, _) = self._kept.popitem(last=False)
            self._kept_bytes -= dropped
        return value

    def all_hashes(self) -> set[str]:
        """Every cached hash (reads the whole index: for tests and reports, not lookups)."""
        out = set(self.fresh)
        if self.compact is not None:
            for path in storage.list_files(self.compact, suffix=".parquet"):
                out.update(_read_table(path).column("image_hash").to_pylist())
        return out


def list_index(folder: str) -> tuple[str | None, list[str]]:
    """The newest complete compacted index of ``folder`` (or None) and its fresh parts."""
    if not storage.exists(folder):
        return None, []
    files = storage.list_files(folder)
    done = sorted(storage.parent(f) for f in files if f.endswith("/" + SUCCESS)
                  and storage.parent(f).rsplit("/", 1)[-1].startswith(COMPACT_PREFIX))
    fresh = sorted(f for f in files if storage.parent(f).rstrip("/") == folder.rstrip("/")
                   and f.endswith(".parquet"))
    return (done[-1] if done else None), fresh


def write_part(folder: str, name: str, rows: list[dict]) -> str:
    """One fresh index part (atomically)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), buf)
    return storage.write_bytes_atomic(storage.join(folder, f"{name}.parquet"), buf.getvalue())


def compact(folder: str) -> int:
    """Merge the fresh parts and the compacted index of ``folder`` into a new compacted index
    (streamed: one bucket in memory at a time); returns its entries. Safe beside readers and
    writers: the new index is complete before anything it replaces is deleted, and fresh parts
    written meanwhile stay."""
    old, fresh = list_index(folder)
    old_meta = json.loads(storage.read_text(storage.join(old, SUCCESS))) if old else None
    if not fresh:
        return old_meta["entries"] if old_meta else 0
    new_rows = sum(_rows(p) for p in fresh)
    digits = bucket_digits((old_meta["entries"] if old_meta else 0) + new_rows)
    name = f"{COMPACT_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex}"
    target = storage.join(folder, name)
    staging = storage.join(folder, f"_tmp-{name}")  # fresh entries split by bucket
    if digits:
        _split(fresh, digits, staging)
    total = 0
    for bucket in _buckets(digits):
        pieces = _old_bucket(old, old_meta, bucket, digits) if old else []
        pieces += _staged(staging, bucket) if digits else fresh
        table = _merged(pieces, bucket)
        if table.num_rows:
            buf = io.BytesIO()
            pq.write_table(table, buf, row_group_size=ROW_GROUP)
            storage.write_bytes_atomic(storage.join(target, f"b-{bucket}.parquet"),
                                       buf.getvalue())
            total += table.num_rows
    storage.write_text_atomic(storage.join(target, SUCCESS),
                              json.dumps({"digits": digits, "entries": total}))
    for path in fresh:
        storage.delete(path, missing_ok=True)
    for path in (old, staging if digits else None):
        if path:
            storage.delete(path, missing_ok=True)
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
            table = _read_table(part)
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
        table = _read_table(path).select(INDEX_SCHEMA.names)
        tables.append(table.filter(pc.starts_with(pc.field("image_hash"), bucket))
                      if bucket else table)
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    hashes = table.column("image_hash").to_numpy(zero_copy_only=False)
    _, first = np.unique(hashes, return_index=True)
    return table.take(pa.array(np.sort(first))).sort_by("image_hash")


def _old_bucket(old: str, meta: dict, bucket: str, digits: int) -> list[str]:
    """The files of the old index that may hold ``bucket``'s hashes (its digit count may
    differ from the new one's)."""
    prefix = bucket[:meta["digits"]]
    if meta["digits"] <= digits:
        names = [f"b-{prefix}.parquet"]
    else:
        names = [f"b-{prefix}{tail}.parquet" for tail in _buckets(meta["digits"] - digits)]
    return [p for p in (storage.join(old, n) for n in names) if storage.exists(p)]

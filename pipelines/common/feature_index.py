"""The feature cache's index: where each image's features live, looked up at flat memory.

Writers add one small *fresh* part per shard (``index/<id>.parquet``). Compaction merges the
fresh parts and the compacted indexes into a new one: entries split into buckets by the first
hex digits of the image hash (1, 16 or 256 buckets: at most about :data:`BUCKET_ENTRIES`
entries each), each bucket one Parquet file ``index/compact-<id>/b-<digits>.parquet`` sorted
by hash in row groups of :data:`ROW_GROUP` entries. The index is complete once its marker
``index/compact-<id>.json`` (written last: digit count, entries, buckets) exists.

Compactions may run at once (two jobs ending on one cache): each merges every complete index
and fresh part it listed, writes its marker, and only then deletes what it merged, so the
marked indexes and the fresh parts together always hold every entry. A compaction whose inputs
another one deleted under it starts again from a new listing. Markers are named by the
compaction's start time, so a listing in name order (S3's) that misses an old marker, deleted
while it listed, sees the newer one that holds its entries.

A reader never loads a whole compacted index: a lookup reads the footer of its bucket (the
row groups' hash ranges) and the one row group that can hold the hash, and keeps what it read
in a least-recently-used cache of bounded size. So a reader's memory is flat in the number of
cached images, and each row group is read at most once while it stays cached. A reader whose
files a compaction deleted opens the index again. Fresh parts are read whole when the reader
opens; after a job's compaction there are none. An image cached twice is served from the
oldest compacted index holding it, else from the first fresh part in name order.
"""

from __future__ import annotations

import io
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
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
SUCCESS = "_SUCCESS"  # the completion mark of an index written before markers
LIST_ATTEMPTS = 3  # listings of an index that compactions changed under it
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


def read_table(path: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(path)))


@dataclass(frozen=True)
class Compacted:
    """One complete compacted index: its bucket folder, its marker (None for an index written
    before markers, complete by its ``_SUCCESS``), digit count, entries and bucket names
    (None: unknown, look for the file)."""

    folder: str
    marker: str | None
    digits: int
    entries: int
    buckets: frozenset[str] | None

    def bucket(self, image_hash: str) -> str | None:
        """The bucket file that may hold ``image_hash`` (None: that bucket is empty)."""
        return self.bucket_file(image_hash[:self.digits])

    def bucket_file(self, name: str) -> str | None:
        """Bucket ``name``'s file (None: that bucket is empty)."""
        if self.buckets is not None and name not in self.buckets:
            return None
        return storage.join(self.folder, f"b-{name}.parquet")

    def files(self) -> list[str]:
        if self.buckets is not None:
            return [storage.join(self.folder, f"b-{b}.parquet") for b in sorted(self.buckets)]
        return storage.list_files(self.folder, suffix=".parquet")


class IndexReader:
    """Lookups in the index of one (expert, key) folder as it was when the reader opened (or,
    if a compaction deleted files it was reading, when it opened again)."""

    def __init__(self, folder: str, budget: int = READER_BYTES) -> None:
        self.folder, self.budget = folder, budget
        self.fresh: dict[str, Entry] = {}
        self.compacts: list[Compacted] = []
        self.entries = 0
        self._kept: OrderedDict[tuple, tuple[int, object]] = OrderedDict()
        self._kept_bytes = 0
        self.bytes_read = 0  # index bytes fetched (footers and row groups)
        self.loads = 0  # row groups read
        self.reopened = 0  # times a compaction's deletions made the reader open again
        self._open()

    def _open(self) -> None:
        for attempt in range(LIST_ATTEMPTS):  # a compaction may delete what was listed
            try:
                compacts, fresh = list_index(self.folder)
                entries: dict[str, Entry] = {}
                for part in fresh:
                    for h, e in _entries(read_table(part)).items():
                        entries.setdefault(h, e)
                break
            except FileNotFoundError:
                if attempt == LIST_ATTEMPTS - 1:
                    raise
        self.compacts, self.fresh = compacts, entries
        self.entries = sum(c.entries for c in compacts)
        self._kept.clear()
        self._kept_bytes = 0

    def find(self, hashes: Sequence[str]) -> list[Entry | None]:
        """Each hash's entry, or None where it is not cached."""
        return [self._find(h) for h in hashes]

    def _find(self, image_hash: str) -> Entry | None:
        try:
            return self._lookup(image_hash)
        except FileNotFoundError:
            log.info("the index of %s changed under a reader (a compaction); opening it again",
                     self.folder)
            self.reopened += 1
            self._open()
            return self._lookup(image_hash)

    def _lookup(self, image_hash: str) -> Entry | None:
        for index in self.compacts:
            found = self._compacted(index, image_hash)
            if found is not None:
                return found
        return self.fresh.get(image_hash)

    def _compacted(self, index: Compacted, image_hash: str) -> Entry | None:
        path = index.bucket(image_hash)
        if path is None:
            return None
        lows = self._keep(("footer", path), lambda: self._footer(path, index.buckets is None))
        if lows is None:
            return None
        group = int(np.searchsorted(lows, image_hash.encode(), side="right")) - 1
        if group < 0:
            return None
        entries = self._keep(("group", path, group), lambda: self._row_group(path, group))
        return entries.get(image_hash)

    def _footer(self, path: str, may_be_missing: bool) -> tuple[object, int]:
        """The first hash of each row group (sorted files: enough to pick the group)."""
        if may_be_missing and not storage.exists(path):
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
        for index in self.compacts:
            for path in index.files():
                out.update(read_table(path).column("image_hash").to_pylist())
        return out


def list_index(folder: str) -> tuple[list[Compacted], list[str]]:
    """The complete compacted indexes of ``folder``, oldest first, and its fresh parts (one
    listing, taken again if a compaction deleted a marker before it was read)."""
    for attempt in range(LIST_ATTEMPTS):
        files, folders = storage.list_dir(folder)
        try:
            return _compacted_indexes(files, folders), [
                f for f in files if f.endswith(".parquet")]
        except FileNotFoundError:
            if attempt == LIST_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _compacted_indexes(files: list[str], folders: list[str]) -> list[Compacted]:
    out = []
    markers = {f[:-len(".json")]: f for f in files
               if _name(f).startswith(COMPACT_PREFIX) and f.endswith(".json")}
    for folder in sorted(set(markers) | {d for d in folders
                                         if _name(d).startswith(COMPACT_PREFIX)}):
        marker = markers.get(folder)
        if marker is not None:
            meta = json.loads(storage.read_text(marker))
            out.append(Compacted(folder, marker, meta["digits"], meta["entries"],
                                 frozenset(meta["buckets"])))
        elif storage.exists(storage.join(folder, SUCCESS)):  # written before markers
            meta = json.loads(storage.read_text(storage.join(folder, SUCCESS)))
            out.append(Compacted(folder, None, meta["digits"], meta["entries"], None))
    return out


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def write_part(folder: str, name: str, rows: list[dict]) -> str:
    """One fresh index part (atomically)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), buf)
    return storage.write_bytes_atomic(storage.join(folder, f"{name}.parquet"), buf.getvalue())

"""The expert feature cache: raw feature shards plus a persistent index, local or on S3.

Layout under the cache root (a local folder or an s3:// prefix)::

    <expert>/<key>/expert.json             what the key stands for (written once)
    <expert>/<key>/shards/<id>.safetensors features of a batch of images, one tensor per image
                                           hash (a plain safetensors file)
    <expert>/<key>/index/<id>.parquet      one entry per image of shard <id>: image_hash,
                                           shard, offset and length of the tensor's bytes in
                                           the file, tokens, channels, dtype
    <expert>/<key>/index/compact-<id>.parquet  many index parts merged into one

``key`` changes whenever the expert's build recipe or weights change
(:func:`mova.checkpoint.expert_cache_key`), so a changed expert never serves stale features.
A writer puts the shard first and its index part second, each atomically and under a fresh
name: readers only see features whose index entry exists, a killed writer leaves at most an
unreferenced shard, and concurrent jobs never overwrite each other (an image cached twice is
served from the first index entry in name order). A reader loads the index once and fetches
exactly the bytes of the features it needs with ranged reads, coalescing neighbours of one
shard into one request.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as save_tensors

from pipelines.common import storage

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
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
SHARD_SUFFIX = ".safetensors"


def shard_file(shard: str) -> str:
    """The file name of an index entry's shard (entries of caches written before shards were
    safetensors files name a raw ``.bin`` shard by its id alone; the bytes read are alike)."""
    return shard if shard.endswith(SHARD_SUFFIX) else f"{shard}.bin"


def _tensor_spans(blob: bytes) -> dict[str, tuple[int, int]]:
    """Name -> (offset, length) of each tensor's bytes in a safetensors file (its header: an
    8-byte little-endian length, then JSON with offsets relative to the data after it)."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    base = 8 + size
    spans = {}
    for name, meta in header.items():
        if name != "__metadata__":
            begin, end = meta["data_offsets"]
            spans[name] = (base + begin, end - begin)
    return spans


def bytes_to_tensor(data: bytes | memoryview, tokens: int, channels: int,
                    dtype: str) -> torch.Tensor:
    """One cached tensor from its raw bytes (little-endian, as safetensors stores them)."""
    return torch.frombuffer(bytearray(data), dtype=STORAGE_DTYPES[dtype]).reshape(tokens,
                                                                                 channels)


def _hash_bytes(hashes: Iterable[str]) -> np.ndarray:
    """Hex digests as fixed-width bytes, for sorting and binary search."""
    return np.array([h.encode() for h in hashes], dtype="S64")


@dataclass
class IndexEntries:
    """A loaded index, sorted by image hash (numpy columns, a few tens of bytes per entry)."""

    hashes: np.ndarray  # S64
    shard: np.ndarray  # int32 into ``shards``
    offset: np.ndarray  # int64
    length: np.ndarray  # int64
    shape: tuple[int, int] | None
    dtype: str | None
    shards: list[str]

    def __len__(self) -> int:
        return len(self.hashes)

    def find(self, hashes: Sequence[str]) -> np.ndarray:
        """Entry position of each hash, -1 where it is not cached."""
        if not len(self.hashes) or not len(hashes):
            return np.full(len(hashes), -1, dtype=np.int64)
        wanted = _hash_bytes(hashes)
        pos = np.searchsorted(self.hashes, wanted)
        pos = np.minimum(pos, len(self.hashes) - 1)
        hit = self.hashes[pos] == wanted
        return np.where(hit, pos, -1)


class FeatureCache:
    """Reads and writes cached expert features under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._indexes: dict[tuple[str, str], IndexEntries] = {}
        self.bytes_read = 0  # what ranged reads fetched (for read amplification)
        self.bytes_served = 0  # what the features returned hold

    # ---- layout ------------------------------------------------------------------------
    def folder(self, expert: str, key: str) -> str:
        return storage.join(self.root, expert, key)

    def describe(self, expert: str, key: str, info: dict) -> None:
        """Write ``expert.json`` (what the key stands for) once."""
        path = storage.join(self.folder(expert, key), "expert.json")
        if not storage.exists(path):
            storage.write_text_atomic(path, json.dumps(info, indent=2, default=str) + "\n")

    def shard_files(self, expert: str, key: str) -> list[str]:
        folder = storage.join(self.folder(expert, key), "shards")
        return storage.list_files(folder, suffix=SHARD_SUFFIX) if storage.exists(folder) else []

    def hashes(self, expert: str, key: str) -> set[str]:
        """Every image hash the index of (expert, key) holds (freshly loaded)."""
        return {h.decode() for h in self.load_index(expert, key, refresh=True).hashes}

    def index_parts(self, expert: str, key: str) -> list[str]:
        folder = storage.join(self.folder(expert, key), "index")
        if not storage.exists(folder):
            return []
        return storage.list_files(folder, suffix=".parquet")

    # ---- writing -----------------------------------------------------------------------
    def write_shard(self, expert: str, key: str, hashes: Sequence[str],
                    features: Iterable[torch.Tensor], dtype: str = "float16") -> tuple[str, int]:
        """Write one shard and then its index part, each atomically; returns (shard path,
        bytes written)."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype={dtype!r}; expected one of {sorted(STORAGE_DTYPES)}")
        name = uuid.uuid4().hex
        tensors: dict[str, torch.Tensor] = {}
        for h, f in zip(hashes, features, strict=True):
            if f.dim() != 2:
                raise ValueError(f"features for {h} must be (tokens, channels), got {f.shape}")
            tensors[h] = f.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous()
        blob = save_tensors(tensors, metadata={"expert": expert, "key": key})
        spans = _tensor_spans(blob)
        entries = [{"image_hash": h, "shard": name + SHARD_SUFFIX, "offset": spans[h][0],
                    "length": spans[h][1], "tokens": int(t.shape[0]),
                    "channels": int(t.shape[1]), "dtype": dtype} for h, t in tensors.items()]
        folder = self.folder(expert, key)
        path = storage.join(folder, "shards", name + SHARD_SUFFIX)
        storage.write_bytes_atomic(path, blob)
        self._write_index(storage.join(folder, "index", f"{name}.parquet"), entries)
        self._indexes.pop((expert, key), None)
        return path, len(blob)

    @staticmethod
    def _write_index(path: str, entries: list[dict]) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(entries, schema=INDEX_SCHEMA), buf)
        storage.write_bytes_atomic(path, buf.getvalue())

    def compact(self, expert: str, key: str) -> int:
        """Merge every index part into one (duplicates dropped); returns its entries. Safe to
        run while others read or write: the merged file lands before its inputs go."""
        parts = self.index_parts(expert, key)
        if len(parts) <= 1:
            return len(self.load_index(expert, key, refresh=True))
        table = _dedupe(pa.concat_tables(_read_parts(parts)))
        folder = storage.join(self.folder(expert, key), "index")
        buf = io.BytesIO()
        pq.write_table(table.sort_by("image_hash"), buf, row_group_size=1 << 16)
        storage.write_bytes_atomic(
            storage.join(folder, f"{COMPACT_PREFIX}{uuid.uuid4().hex}.parquet"), buf.getvalue())
        for part in parts:
            storage.delete(part, missing_ok=True)
        self._indexes.pop((expert, key), None)
        return table.num_rows

    # ---- reading -----------------------------------------------------------------------
    def load_index(self, expert: str, key: str, refresh: bool = False) -> IndexEntries:
        """The index of (expert, key), loaded once per cache object."""
        if not refresh and (expert, key) in self._indexes:
            return self._indexes[(expert, key)]
        for attempt in range(3):  # a compaction may delete a part between listing and reading
            try:
                tables = _read_parts(self.index_parts(expert, key))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        table = _dedupe(pa.concat_tables(tables)) if tables else INDEX_SCHEMA.empty_table()
        table = table.sort_by("image_hash")
        shards, shard_idx = np.unique(table.column("shard").to_numpy(zero_copy_only=False),
                                      return_inverse=True)
        first = table.slice(0, 1).to_pylist()
        entries = IndexEntries(
            hashes=_hash_bytes(table.column("image_hash").to_pylist()),
            shard=shard_idx.astype(np.int32),
            offset=table.column("offset").to_numpy(), length=table.column("length").to_numpy(),
            shape=(first[0]["tokens"], first[0]["channels"]) if first else None,
            dtype=first[0]["dtype"] if first else None, shards=[str(s) for s in shards])
        self._indexes[(expert, key)] = entries
        return entries

    def cached(self, expert: str, key: str, hashes: Sequence[str]) -> np.ndarray:
        """Whether each image's features are cached (bool array)."""
        return self.load_index(expert, key).find(hashes) >= 0

    def get_many(self, expert: str, key: str, hashes: Sequence[str]) -> list[torch.Tensor]:
        """The cached (tokens, channels) features of several images, fetched with one ranged
        read per run of neighbouring entries of a shard; KeyError naming a missing one."""
        index = self.load_index(expert, key)
        pos = index.find(hashes)
        missing = [h for h, p in zip(hashes, pos, strict=True) if p < 0]
        if missing:
            raise KeyError(f"no cached {expert} features (key {key}) for image {missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        out: list[torch.Tensor | None] = [None] * len(hashes)
        order = sorted(range(len(hashes)), key=lambda i: (index.shard[pos[i]],
                                                          index.offset[pos[i]]))
        folder = storage.join(self.folder(expert, key), "shards")
        assert index.shape is not None and index.dtype is not None
        run: list[int] = []
        for i in order + [-1]:
            if run and (i < 0 or index.shard[pos[i]] != index.shard[pos[run[0]]]
                        or index.offset[pos[i]] > index.offset[pos[run[-1]]]
                        + index.length[pos[run[-1]]]):
                self._read_run(folder, index, [pos[j] for j in run], run, out)
                run = []
            if i >= 0:
                run.append(i)
        return out  # type: ignore[return-value]

    def _read_run(self, folder: str, index: IndexEntries, entries: list[int], rows: list[int],
                  out: list[torch.Tensor | None]) -> None:
        start = int(index.offset[entries[0]])
        end = int(max(index.offset[e] + index.length[e] for e in entries))
        path = storage.join(folder, shard_file(index.shards[index.shard[entries[0]]]))
        data = storage.read_range(path, start, end - start)
        self.bytes_read += len(data)
        view = memoryview(data)
        for entry, row in zip(entries, rows, strict=True):
            lo = int(index.offset[entry]) - start
            piece = view[lo:lo + int(index.length[entry])]
            self.bytes_served += len(piece)
            out[row] = bytes_to_tensor(piece, *index.shape, index.dtype)

    def get(self, expert: str, key: str, image_hash: str) -> torch.Tensor:
        """The cached features of one image; KeyError if not cached."""
        return self.get_many(expert, key, [image_hash])[0]


def _read_parts(parts: Sequence[str]) -> list[pa.Table]:
    return [pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in sorted(parts)]


def _dedupe(table: pa.Table) -> pa.Table:
    """One entry per image hash: the first in part-name order."""
    hashes = table.column("image_hash").to_numpy(zero_copy_only=False)
    _, first = np.unique(hashes, return_index=True)
    return table.take(pa.array(np.sort(first)))


def feature_bytes(tokens: int, channels: int, dtype: str) -> int:
    """How many bytes one image's features take in the cache."""
    return tokens * channels * _ITEM_BYTES[dtype]

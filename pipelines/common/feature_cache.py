"""The expert feature cache: raw feature shards plus a persistent index, local or on S3.

Layout under the cache root (a local folder or an s3:// prefix)::

    <expert>/<key>/expert.json             what the key stands for (written once)
    <expert>/<key>/shards/<id>.safetensors features of a batch of images, one tensor per image
                                           hash (a plain safetensors file)
    <expert>/<key>/index/<id>.parquet      one entry per image of shard <id>: image_hash,
                                           shard, offset and length of the tensor's bytes in
                                           the file, tokens, channels, dtype
    <expert>/<key>/index/compact-<id>/     the parts merged, in hash buckets, for lookups at
                                           flat memory (:mod:`pipelines.common.feature_index`)
    <expert>/<key>/index/compact-<id>.json that compacted index's marker (written last)

``key`` changes whenever the expert's build recipe or weights change
(:func:`mova.checkpoint.expert_cache_key`), so a changed expert never serves stale features.
A writer puts the shard first and its index part second, each atomically and under a fresh
name: readers only see features whose index entry exists, a killed writer leaves at most an
unreferenced shard, and concurrent jobs never overwrite each other (an image cached twice is
served from the first index entry). A reader looks entries up without loading the whole index
(its memory is flat in the number of cached images) and fetches exactly the bytes of the
features it needs with ranged reads, coalescing neighbours of one shard into one request.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from pipelines.common import storage
from pipelines.common.feature_compaction import compact
from pipelines.common.feature_index import Entry, IndexReader, list_index, write_part

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
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


class FeatureCache:
    """Reads and writes cached expert features under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._readers: dict[tuple[str, str], IndexReader] = {}
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

    def index_folder(self, expert: str, key: str) -> str:
        return storage.join(self.folder(expert, key), "index")

    def index_parts(self, expert: str, key: str) -> list[str]:
        """The index's files: fresh parts, and the buckets of its compacted index."""
        compacts, fresh = list_index(self.index_folder(expert, key))
        return fresh + [path for index in compacts for path in index.files()]

    def hashes(self, expert: str, key: str) -> set[str]:
        """Every image hash the index of (expert, key) holds (freshly read, whole)."""
        return IndexReader(self.index_folder(expert, key)).all_hashes()

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
        path = storage.join(self.folder(expert, key), "shards", name + SHARD_SUFFIX)
        storage.write_bytes_atomic(path, blob)
        write_part(self.index_folder(expert, key), name, entries)
        return path, len(blob)

    def compact(self, expert: str, key: str) -> int:
        """Merge the index's fresh parts and compacted indexes into one; returns its entries.
        Safe to run while others read, write or compact."""
        entries = compact(self.index_folder(expert, key))
        self._readers.pop((expert, key), None)
        return entries

    # ---- reading -----------------------------------------------------------------------
    def reader(self, expert: str, key: str, refresh: bool = False) -> IndexReader:
        """The index of (expert, key) as it is now, opened once per cache object."""
        if refresh or (expert, key) not in self._readers:
            self._readers[(expert, key)] = IndexReader(self.index_folder(expert, key))
        return self._readers[(expert, key)]

    def cached(self, expert: str, key: str, hashes: Sequence[str]) -> np.ndarray:
        """Whether each image's features are cached (bool array)."""
        return np.array([e is not None for e in self.reader(expert, key).find(hashes)], bool)

    def get_many(self, expert: str, key: str, hashes: Sequence[str]) -> list[torch.Tensor]:
        """The cached (tokens, channels) features of several images, fetched with one ranged
        read per run of neighbouring entries of a shard; KeyError naming a missing one."""
        entries = self.reader(expert, key).find(hashes)
        missing = [h for h, e in zip(hashes, entries, strict=True) if e is None]
        if missing:
            raise KeyError(f"no cached {expert} features (key {key}) for image {missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        out: list[torch.Tensor | None] = [None] * len(hashes)
        order = sorted(range(len(hashes)), key=lambda i: (entries[i].shard, entries[i].offset))
        folder = storage.join(self.folder(expert, key), "shards")
        run: list[int] = []
        for i in order + [-1]:
            if run and (i < 0 or entries[i].shard != entries[run[0]].shard
                        or entries[i].offset > entries[run[-1]].offset
                        + entries[run[-1]].length):
                self._read_run(folder, [entries[j] for j in run], run, out)
                run = []
            if i >= 0:
                run.append(i)
        return out  # type: ignore[return-value]

    def _read_run(self, folder: str, entries: list[Entry], rows: list[int],
                  out: list[torch.Tensor | None]) -> None:
        start = entries[0].offset
        end = max(e.offset + e.length for e in entries)
        data = storage.read_range(storage.join(folder, shard_file(entries[0].shard)), start,
                                  end - start)
        self.bytes_read += len(data)
        view = memoryview(data)
        for entry, row in zip(entries, rows, strict=True):
            piece = view[entry.offset - start:entry.offset - start + entry.length]
            self.bytes_served += len(piece)
            out[row] = bytes_to_tensor(piece, entry.tokens, entry.channels, entry.dtype)

    def get(self, expert: str, key: str, image_hash: str) -> torch.Tensor:
        """The cached features of one image; KeyError if not cached."""
        return self.get_many(expert, key, [image_hash])[0]


def feature_bytes(tokens: int, channels: int, dtype: str) -> int:
    """How many bytes one image's features take in the cache."""
    return tokens * channels * _ITEM_BYTES[dtype]

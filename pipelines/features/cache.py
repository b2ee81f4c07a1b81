"""The expert feature cache: Parquet shards keyed by (image hash, expert, expert key).

Layout (local folder or s3://)::

    <root>/<expert>/<key>/expert.json          what the key stands for (written once)
    <root>/<expert>/<key>/shard-<uuid>.parquet columns image_hash, features (raw bytes at the
                                               expert's native grid), tokens, channels, dtype

``key`` changes whenever the expert's build recipe or weights change
(:func:`mova.checkpoint.expert_cache_key`), so a changed expert never serves stale features.
Shards are written whole and atomically; readers only ever see complete shards.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.common import storage

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_PREFIX = "shard-"
SCHEMA = pa.schema([
    ("image_hash", pa.string()),
    ("features", pa.binary()),
    ("tokens", pa.int32()),
    ("channels", pa.int32()),
    ("dtype", pa.string()),
])


def tensor_to_bytes(t: torch.Tensor, dtype: str) -> bytes:
    t = t.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def bytes_to_tensor(data: bytes, tokens: int, channels: int, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        arr = np.frombuffer(data, dtype=np.int16).reshape(tokens, channels)
        return torch.from_numpy(arr.copy()).view(torch.bfloat16)
    arr = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(tokens, channels)
    return torch.from_numpy(arr.copy())


class FeatureCache:
    """Reads and writes cached expert features under ``root``."""

    def __init__(self, root: str, max_open_shards: int = 64) -> None:
        self.root = root
        self._tables: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._shard_data: OrderedDict[str, pa.Table] = OrderedDict()
        self._max_open = max_open_shards
        self._index: dict[tuple[str, str], dict[str, str]] = {}

    def folder(self, expert: str, key: str) -> str:
        return storage.join(self.root, expert, key)

    def describe(self, expert: str, key: str, info: dict) -> None:
        """Write ``expert.json`` (what the key stands for) once."""
        path = storage.join(self.folder(expert, key), "expert.json")
        if not storage.exists(path):
            storage.write_text_atomic(path, json.dumps(info, indent=2, default=str) + "\n")

    def shards(self, expert: str, key: str) -> list[str]:
        folder = self.folder(expert, key)
        if not storage.exists(folder):
            return []
        return [p for p in storage.list_files(folder, suffix=".parquet")
                if p.rsplit("/", 1)[-1].startswith(SHARD_PREFIX)]

    def index(self, expert: str, key: str, refresh: bool = False) -> dict[str, str]:
        """image hash -> shard path, over every complete shard of (expert, key)."""
        if refresh or (expert, key) not in self._index:
            index: dict[str, str] = {}
            for shard in self.shards(expert, key):
                table = pq.read_table(io.BytesIO(storage.read_bytes(shard)),
                                      columns=["image_hash"])
                for h in table.column("image_hash").to_pylist():
                    index.setdefault(h, shard)
            self._index[(expert, key)] = index
        return self._index[(expert, key)]

    def write_shard(self, expert: str, key: str, hashes: Sequence[str],
                    features: Iterable[torch.Tensor], dtype: str = "float16") -> tuple[str, int]:
        """Write one shard atomically; returns (path, bytes written)."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype={dtype!r}; expected one of {sorted(STORAGE_DTYPES)}")
        rows = {"image_hash": [], "features": [], "tokens": [], "channels": [], "dtype": []}
        for h, f in zip(hashes, features, strict=True):
            if f.dim() != 2:
                raise ValueError(f"features for {h} must be (tokens, channels), got {f.shape}")
            rows["image_hash"].append(h)
            rows["features"].append(tensor_to_bytes(f, dtype))
            rows["tokens"].append(int(f.shape[0]))
            rows["channels"].append(int(f.shape[1]))
            rows["dtype"].append(dtype)
        buf = io.BytesIO()
        pq.write_table(pa.table(rows, schema=SCHEMA), buf, compression="zstd")
        path = storage.join(self.folder(expert, key), f"{SHARD_PREFIX}{uuid.uuid4().hex}.parquet")
        data = buf.getvalue()
        storage.write_bytes_atomic(path, data)
        return path, len(data)

    def _shard_rows(self, shard: str) -> tuple[pa.Table, dict[str, int]]:
        if shard in self._shard_data:
            self._shard_data.move_to_end(shard)
            return self._shard_data[shard], self._tables[shard]
        table = pq.read_table(io.BytesIO(storage.read_bytes(shard)))
        rows = {h: i for i, h in enumerate(table.column("image_hash").to_pylist())}
        self._shard_data[shard] = table
        self._tables[shard] = rows
        while len(self._shard_data) > self._max_open:
            old, _ = self._shard_data.popitem(last=False)
            self._tables.pop(old, None)
        return table, rows

    def get(self, expert: str, key: str, image_hash: str) -> torch.Tensor:
        """The cached (tokens, channels) features of one image; KeyError if not cached."""
        shard = self.index(expert, key).get(image_hash)
        if shard is None:
            raise KeyError(f"no cached {expert} features (key {key}) for image {image_hash}")
        table, rows = self._shard_rows(shard)
        i = rows[image_hash]
        return bytes_to_tensor(table.column("features")[i].as_py(),
                               table.column("tokens")[i].as_py(),
                               table.column("channels")[i].as_py(),
                               table.column("dtype")[i].as_py())

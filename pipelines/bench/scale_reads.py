"""What `mova bench scale` measures of reading at scale: a feature-cache reader's memory and
index reads at N cached entries, the manifest bytes each training rank reads, and how often a
Parquet manifest's row groups are decoded."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from pipelines.bench.harness import process_peak_mib
from pipelines.common.feature_cache import FeatureCache
from pipelines.common.manifests.chunks import ManifestScan
from pipelines.common.manifests.rows import write_manifest
from pipelines.common.manifests.scan import merge_ranges, scan_range, scan_tasks
from pipelines.common.manifests.stream import chunk_samples
from pipelines.train.order import EpochOrder, worker_windows

INDEX_PART = 50_000  # index entries per written part before compaction
LOOKUPS = 2_000  # random hashes looked up, in batches of 8 (a training worker's pattern)
WORLDS = (2, 4)


def _hash(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def write_index(root: Path, entries: int) -> float:
    """A cache index of ``entries`` tiny features, written in parts, then compacted;
    returns the compaction's seconds."""
    cache = FeatureCache(str(root))
    feature = torch.zeros(1, 4)
    for first in range(0, entries, INDEX_PART):
        n = min(INDEX_PART, entries - first)
        cache.write_shard("synthetic", "k", [_hash(first + i) for i in range(n)],
                          [feature] * n)
    start = time.perf_counter()
    cache.compact("synthetic", "k")
    return time.perf_counter() - start


def reader_step(root: str, entries: int, seed: int = 0) -> dict[str, Any]:
    """A fresh reader (run in a child process, whose peak memory is reported) looks up
    :data:`LOOKUPS` random cached hashes, 8 at a time."""
    rng = random.Random(seed)
    cache = FeatureCache(root)
    reader = cache.reader("synthetic", "k")
    start = time.perf_counter()
    for _ in range(LOOKUPS // 8):
        found = reader.find([_hash(rng.randrange(entries)) for _ in range(8)])
        if any(e is None for e in found):
            raise RuntimeError("a cached hash was not found")
    return {"lookup_ms": (time.perf_counter() - start) * 1000 / LOOKUPS,
            "row_group_loads": reader.loads, "index_bytes_read": reader.bytes_read,
            "reader_peak_mib": process_peak_mib()}


def rank_read_ratio(scan: ManifestScan, world: int, window_chunks: int = 8) -> float:
    """The most manifest bytes any training rank reads in an epoch, over ``manifest/world``."""
    chunks = scan.chunks
    total = sum(c.end - c.start for c in chunks)
    order = EpochOrder(seed=0, epoch=0, world=world, window_chunks=window_chunks)
    per_rank = [sum(chunks[i].end - chunks[i].start for w in
                    worker_windows([c.valid for c in chunks], order, rank)
                    for i in w["chunks"]) for rank in range(world)]
    return max(per_rank) / (total / world)


def parquet_amplification(jsonl: str, path: Path, group_rows: int) -> dict[str, Any]:
    """The manifest as Parquet with row groups of ``group_rows`` rows, scanned and read in
    full as every stage reads it (chunk by chunk): rows decoded per row in the manifest."""
    rows = [line for line in Path(jsonl).read_text().splitlines() if line]
    staging = path.with_suffix(".tmp.parquet")
    write_manifest((json.loads(r) for r in rows), str(staging))
    pq.write_table(pq.read_table(staging), path, row_group_size=group_rows)
    staging.unlink()
    decoded = [0]
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            decoded[0] += batch.num_rows
            yield batch

    pq.ParquetFile.iter_batches = counting  # this child process only
    try:
        tasks = scan_tasks([str(path)])
        scan = merge_ranges(str(path), tasks, [scan_range(t, None) for t in tasks])
        scanned = decoded[0]
        read = sum(len(chunk_samples(c.to_dict(), None, False)) for c in scan.chunks)
    finally:
        pq.ParquetFile.iter_batches = real
    return {"rows": len(rows), "groups": pq.ParquetFile(path).num_row_groups,
            "chunks": len(scan.chunks), "read_rows": read,
            "read_amplification": (decoded[0] - scanned) / max(read, 1),
            "scan_amplification": scanned / max(len(rows), 1)}

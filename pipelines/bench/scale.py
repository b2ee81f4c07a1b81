"""`mova bench scale`: the data path at 10k, 100k and 1M manifest rows, against the plain way.

For each size the manifest repeats the rows of a small synthetic workspace under new ids (so
every image is cached once) and the benchmark measures, with the driver's resident memory
sampled during each step:

* **scan** (Ray tasks over byte ranges, ids checked across the manifest) vs the plain
  ``load_manifest`` that holds every row in the driver;
* **stream**: every valid row through ``manifest_dataset`` (rows/s; the driver sees counts);
* **first batch** of the training data path (``worker_dataset``: the scan's chunks, the epoch
  order, cached features read with ranged reads) vs the plain way (load the manifest, then
  prepare the first batch);
* **index**: a feature-cache index of as many entries as rows (written in parts, compacted)
  and a fresh reader's peak memory and index reads for 2,000 random lookups;
* **ranks**: the manifest bytes each training rank reads at world 2 and 4 (vs manifest/world);
* **cached re-run** of ``mova features`` over the manifest (every image already cached).

Once, at the full preset's feature shape of one expert, it measures the read amplification of
a random training batch: bytes fetched per byte served, ranged reads vs reading whole shards;
and at the largest size, the manifest as Parquet with 1M-row row groups, read chunk by chunk:
rows decoded per row read.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from mova.checkpoint import load_config
from mova.experts.registry import get_expert_spec
from pipelines.bench.features import make_workspace
from pipelines.bench.harness import machine_info, process_peak_mib
from pipelines.bench.scale_reads import (
    LOOKUPS,
    WORLDS,
    parquet_amplification,
    rank_read_ratio,
    reader_step,
    write_index,
)
from pipelines.bench.train import fill_cache
from pipelines.common import storage
from pipelines.common.batches import PrepareSpec, prepare_rows
from pipelines.common.feature_cache import FeatureCache, feature_bytes, shard_file
from pipelines.common.manifests.scan import scan_manifest
from pipelines.common.manifests.stream import manifest_dataset
from pipelines.common.manifests.validate import load_manifest, resolve_image
from pipelines.common.ray_init import init_ray
from pipelines.features.job import run_features
from pipelines.features.recipe import FeaturesRecipe
from pipelines.train.dataset import worker_dataset
from pipelines.train.order import EpochOrder

log = logging.getLogger(__name__)

SIZES = (10_000, 100_000, 1_000_000)
BASE_IMAGES = 64  # distinct images (and base rows) every manifest repeats
FIRST_BATCH = 8
PARQUET_GROUP_ROWS = 1 << 20


def in_child(step: str, address: str | None, timeout_s: float = 3600, **kwargs: Any
             ) -> dict[str, Any]:
    """Run ``step`` in a fresh Python process (joined to Ray at ``address``), so its peak
    resident memory is its own; returns the step's figures plus ``peak_mib``."""
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        out = pool.apply_async(_child_main, (step, address, kwargs)).get(timeout=timeout_s)
    except BaseException:
        pool.terminate()
        raise
    pool.close()  # let the child leave Ray and exit on its own
    pool.join()
    return out


def _child_main(step: str, address: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    if address:
        init_ray(address)
    out = STEPS[step](**kwargs)
    out["peak_mib"] = process_peak_mib()
    if address:
        ray.shutdown()
    return out


def grow_manifest(base: str, rows: int, path: Path) -> Path:
    """``rows`` rows cycling through ``base``'s rows, ids ``r<n>``, image paths absolute."""
    template = []
    for line in Path(base).read_text().splitlines():
        row = json.loads(line)
        if row.get("image"):
            row["image"] = resolve_image(base, row["image"])
        template.append(row)
    with path.open("w") as handle:
        for n in range(rows):
            row = template[n % len(template)]
            row["id"] = f"r{n}"
            handle.write(json.dumps(row) + "\n")
    return path


@dataclass
class SizeResult:
    rows: int
    manifest_mib: float
    chunks: int
    scan_s: float
    scan_reused_s: float  # the same scan again, kept by the first (manifests.scan_cache)
    stream_rows_per_s: float
    first_batch_s: float  # after the scan
    driver_peak_mib: float  # the streaming driver process: scan, stream, first batch
    plain_load_s: float
    plain_first_batch_s: float  # load + prepare, from the start
    plain_peak_mib: float
    index_entries: int
    index_compact_s: float
    reader_peak_mib: float
    index_row_group_loads: int
    index_bytes_per_lookup: float
    rank_read_ratio: dict[int, float] = field(default_factory=dict)  # world -> max/ (1/world)
    rerun_s: float | None = None
    rerun_peak_mib: float | None = None


@dataclass
class Amplification:
    expert: str
    tokens: int
    channels: int
    batch: int
    shards: int
    ranged_bytes_ratio: float
    ranged_s: float
    whole_shard_bytes_ratio: float
    whole_shard_s: float


@dataclass
class ScaleResult:
    sizes: list[SizeResult] = field(default_factory=list)
    amplification: Amplification | None = None
    parquet: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    key: str = "bench:scale:cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def streaming_driver(manifest: str, pool: list[str], checkpoint: str, cache: str
                     ) -> dict[str, Any]:
    """What a job's driver does: scan, stream every row (counting them), first batch."""
    scan, scan_s = _timed(scan_manifest, manifest, pool=pool)  # a first scan, then kept
    scan.require_ok(False)
    _, reused_s = _timed(scan_manifest, manifest, pool=pool)  # what a later stage pays
    return {"scan_s": scan_s, "scan_reused_s": reused_s, "chunks": len(scan.chunks),
            "rank_read_ratio": {w: rank_read_ratio(scan, w) for w in WORLDS},
            "stream_rows_per_s": stream_rows_per_s(scan, pool),
            "first_batch_s": first_batch_s(scan, pool, checkpoint, cache)}


def plain_driver(manifest: str, pool: list[str], checkpoint: str, cache: str
                 ) -> dict[str, Any]:
    """The plain way: every row in the driver, then the first batch prepared."""
    spec = PrepareSpec(checkpoint=checkpoint, cache=cache, features="cached", max_length=None)
    start = time.perf_counter()
    samples = load_manifest(manifest, pool=pool, check_images=False)
    load_s = time.perf_counter() - start
    prepare_rows([(manifest, s) for s in samples[:FIRST_BATCH]], spec)
    return {"load_s": load_s, "first_batch_s": time.perf_counter() - start}


def stream_rows_per_s(scan: Any, pool: Sequence[str]) -> float:
    start = time.perf_counter()
    count = 0
    for batch in manifest_dataset(scan, pool=pool).iter_batches(batch_size=4096,
                                                                 batch_format="numpy"):
        count += len(batch["line"])
    if count != scan.valid:
        raise RuntimeError(f"the stream gave {count} rows; the scan counted {scan.valid}")
    return count / (time.perf_counter() - start)


def first_batch_s(scan: Any, pool: list[str], checkpoint: str, cache: str) -> float:
    """Seconds from a scanned manifest to the first prepared batch of worker 0."""
    spec = PrepareSpec(checkpoint=checkpoint, cache=cache, features="cached", max_length=None)
    start = time.perf_counter()
    dataset = worker_dataset([c.to_dict() for c in scan.chunks], EpochOrder(0, 0, 1), 0, 0,
                             spec, pool, prepare_batch_size=FIRST_BATCH)
    for batch in dataset.iter_batches(batch_size=FIRST_BATCH, batch_format="numpy"):
        if len(batch["input_ids"]) != FIRST_BATCH:
            raise RuntimeError("the first batch is short")
        break
    return time.perf_counter() - start


def rerun_driver(manifest: str, checkpoint: str, cache: str) -> dict[str, Any]:
    recipe = FeaturesRecipe(manifest=manifest, checkpoint=checkpoint, cache=cache,
                            experts="all").validate()
    summary, seconds = _timed(run_features, recipe)
    if summary.computed:
        raise RuntimeError(f"the cached re-run computed {summary.computed} features")
    return {"seconds": seconds}


STEPS = {"stream": streaming_driver, "plain": plain_driver, "rerun": rerun_driver,
         "reader": reader_step, "parquet": parquet_amplification}


def amplification_step(root: Path, expert: str = "dinov2", images: int = 64,
                       shard_images: int = 16, batch: int = 16, seed: int = 0
                       ) -> Amplification:
    """A random batch read from a cache at the full preset's shape of ``expert``: ranged
    reads (what training does) vs whole shard files."""
    size = get_expert_spec(expert).size("full")
    tokens, channels = size.out_grid ** 2, size.out_channels
    cache = FeatureCache(str(root))
    hashes = [f"{i:064x}" for i in range(images)]
    for first in range(0, images, shard_images):
        part = hashes[first:first + shard_images]
        cache.write_shard(expert, "full", part,
                          [torch.randn(tokens, channels) for _ in part], dtype="float16")
    wanted = random.Random(seed).sample(hashes, batch)
    reader = FeatureCache(str(root))
    index = reader.reader(expert, "full")  # opened before the timed read
    _, ranged_s = _timed(reader.get_many, expert, "full", wanted)
    shards = {entry.shard for entry in index.find(wanted)}
    folder = storage.join(reader.folder(expert, "full"), "shards")
    start = time.perf_counter()
    whole = sum(len(storage.read_bytes(storage.join(folder, shard_file(s)))) for s in shards)
    whole_s = time.perf_counter() - start
    served = batch * feature_bytes(tokens, channels, "float16")
    return Amplification(expert, tokens, channels, batch, len(shards),
                         reader.bytes_read / served, ranged_s, whole / served, whole_s)


def bench_scale(workdir: str | Path, *, sizes: Sequence[int] = SIZES,
                rerun_max: int = 100_000, seed: int = 0) -> ScaleResult:
    """Every step at every size (starts a private local Ray unless one is up)."""
    started = not ray.is_initialized()
    if started:
        init_ray(None)
    try:
        return _run_sizes(Path(workdir), sizes, rerun_max, seed)
    finally:
        if started:
            ray.shutdown()


def _run_sizes(root: Path, sizes: Sequence[int], rerun_max: int, seed: int) -> ScaleResult:
    base, checkpoint = make_workspace(root / "base", BASE_IMAGES, image_size=64, seed=seed)
    cache = str(root / "features")
    fill_cache(base, checkpoint, cache, rows_all=BASE_IMAGES)  # every expert of every image
    pool = load_config(checkpoint).expert_names
    result = ScaleResult(machine=machine_info(torch.device("cpu")))
    address = ray.get_runtime_context().gcs_address
    os.environ["MOVA_SCAN_CACHE"] = str(root / "scans")  # the children's; none kept before
    for rows in sizes:
        manifest = str(grow_manifest(base, rows, root / f"rows-{rows}.jsonl"))
        mib = Path(manifest).stat().st_size / 2**20
        log.info("%d rows: %.0f MiB manifest", rows, mib)
        args = {"manifest": manifest, "checkpoint": checkpoint, "cache": cache}
        stream = in_child("stream", address, pool=pool, **args)
        plain = in_child("plain", None, pool=pool, **args)
        rerun = in_child("rerun", address, **args) if rows <= rerun_max else {}
        compact_s = write_index(root / f"index-{rows}", rows)
        reader = in_child("reader", None, root=str(root / f"index-{rows}"), entries=rows)
        result.sizes.append(SizeResult(
            rows=rows, manifest_mib=mib, chunks=stream["chunks"], scan_s=stream["scan_s"],
            scan_reused_s=stream["scan_reused_s"],
            stream_rows_per_s=stream["stream_rows_per_s"],
            first_batch_s=stream["first_batch_s"], driver_peak_mib=stream["peak_mib"],
            plain_load_s=plain["load_s"], plain_first_batch_s=plain["first_batch_s"],
            plain_peak_mib=plain["peak_mib"], index_entries=rows, index_compact_s=compact_s,
            reader_peak_mib=reader["reader_peak_mib"],
            index_row_group_loads=reader["row_group_loads"],
            index_bytes_per_lookup=reader["index_bytes_read"] / LOOKUPS,
            rank_read_ratio=stream["rank_read_ratio"], rerun_s=rerun.get("seconds"),
            rerun_peak_mib=rerun.get("peak_mib")))
        log.info("%s", result.sizes[-1])
    result.amplification = amplification_step(root / "full-cache", images=32, shard_images=8,
                                               batch=8, seed=seed)
    result.parquet = in_child("parquet", None, jsonl=manifest, path=root / "rows.parquet",
                              group_rows=PARQUET_GROUP_ROWS)
    return result

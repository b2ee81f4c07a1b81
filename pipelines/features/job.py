"""`mova features`: compute frozen expert features once, with Ray Data, into the feature cache.

One streaming dataset from the manifest to the cache: manifest chunks -> rows (checked; bad rows
named, or skipped with a report) -> the experts each row's image needs (its routing label, or
all) -> one row per distinct image -> decode and content hash, once per image (Ray tasks) ->
one actor pool per expert, all pools at work at the same time, each computing only the images
it is asked for and has not cached and writing them as atomic shards with their index parts ->
per-image counts back to the driver. Each expert's index parts are merged at the end. A re-run
computes nothing that is cached; a killed run loses at most the batches in flight.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray

from mova.checkpoint import expert_cache_keys, load_config
from mova.experts.registry import resolve_expert
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint, part_bytes
from pipelines.common.feature_cache import FeatureCache
from pipelines.common.manifests.scan import scan_manifest
from pipelines.common.manifests.stream import manifest_dataset
from pipelines.common.resources import actor_memory, actor_pool_args, image_item_bytes
from pipelines.features.recipe import FeaturesRecipe
from pipelines.features.workers import (
    ExpertSpec,
    ExpertWorker,
    decode_images,
    image_needs,
    union_needs,
)

log = logging.getLogger(__name__)
READ_CPUS = 0.5  # a read/decode task: light, and it must fit next to the expert actors
# rows per partition of the by-image shuffle (one image's rows meet in one partition)
ROWS_PER_SHUFFLE_PARTITION = 100_000


@dataclass
class ExpertSummary:
    expert: str
    key: str
    needed: int = 0
    cached: int = 0
    computed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


@dataclass
class FeaturesSummary:
    images: int
    bad_images: int
    experts: list[ExpertSummary] = field(default_factory=list)
    seconds: float = 0.0
    cache: str = ""
    report: str | None = None
    bad_rows: int = 0

    @property
    def computed(self) -> int:
        return sum(e.computed for e in self.experts)

    @property
    def skipped(self) -> int:
        return sum(e.cached for e in self.experts)

    def to_dict(self) -> dict:
        return {**asdict(self), "computed": self.computed, "skipped": self.skipped}

    def format(self) -> str:
        lines = [f"{'expert':<12}{'needed':>8}{'cached':>8}{'computed':>10}{'MB':>9}"
                 f"{'img/s':>9}"]
        for e in self.experts:
            lines.append(f"{e.expert:<12}{e.needed:>8}{e.cached:>8}{e.computed:>10}"
                         f"{e.bytes_written / 1e6:>9.2f}{e.images_per_s:>9.1f}")
        lines.append(f"{self.images} distinct images ({self.bad_images} bad), "
                     f"{self.computed} features computed, {self.skipped} already cached, "
                     f"{sum(e.bytes_written for e in self.experts) / 1e6:.2f} MB written in "
                     f"{self.seconds:.1f} s")
        lines.append(f"Feature cache: {self.cache}")
        if self.report:
            lines.append(f"Skipped rows and images are listed in {self.report}")
        return "\n".join(lines)


def run_features(recipe: FeaturesRecipe) -> FeaturesSummary:
    """Run the feature-cache job; returns what it did."""
    start = time.perf_counter()
    recipe = recipe.absolute().validate()
    checkpoint = local_checkpoint(recipe.checkpoint, parts=["meta"])  # configs and keys
    config, keys = load_config(checkpoint), expert_cache_keys(checkpoint)
    pool = config.expert_names
    unknown = sorted(set(recipe.only) - set(pool))
    if unknown:
        raise ValueError(f"features recipe: only={unknown} are not in the checkpoint's pool "
                         f"{pool}")
    wanted = [e for e in pool if not recipe.only or e in recipe.only]
    report = recipe.report or storage.join(recipe.cache, "_reports",
                                           f"features-{int(time.time())}")
    recipe.start_ray()
    scan = scan_manifest(recipe.manifest, pool=pool,
                         report=report if recipe.skip_bad_rows else None)
    scan.require_ok(recipe.skip_bad_rows)
    cache = FeatureCache(recipe.cache)
    for name in wanted:
        cache.describe(name, keys[name], {"expert": name, "key": keys[name],
                                          "checkpoint": recipe.checkpoint})
    summary = FeaturesSummary(images=0, bad_images=0, cache=recipe.cache,
                              experts=[ExpertSummary(expert=n, key=keys[n]) for n in pool],
                              bad_rows=scan.rows - scan.valid)
    sides = {e.name: resolve_expert(e).size.image_size for e in config.experts}
    for batch in _pipeline(recipe, sides, keys, wanted, scan, report).iter_batches(
            batch_size=1024, batch_format="numpy"):
        _count(summary, batch)
    if summary.bad_images or summary.bad_rows:
        summary.report = report
        log.warning("skipped %d bad row(s) and %d unreadable image(s); see %s",
                    summary.bad_rows, summary.bad_images, report)
    _compact(cache, [(e.expert, e.key) for e in summary.experts if e.computed])
    summary.seconds = time.perf_counter() - start
    return summary


def _pipeline(recipe: FeaturesRecipe, sides: dict[str, int], keys: dict[str, str],
              wanted: list[str], scan: Any, report: str) -> Any:
    """The streaming dataset: rows -> distinct images -> decode once -> every expert pool."""
    cpus = _cpus_per_worker(recipe, len(wanted))
    ds = (manifest_dataset(scan, pool=list(keys), skip_bad_rows=recipe.skip_bad_rows)
          .map_batches(image_needs, fn_kwargs={"mode": recipe.experts, "wanted": wanted},
                       batch_size=256, num_cpus=READ_CPUS)
          .groupby("uri", num_partitions=shuffle_partitions(scan.rows))
          .map_groups(union_needs, fn_kwargs={"wanted": wanted})
          .map_batches(decode_images, batch_size=recipe.batch_size, num_cpus=READ_CPUS,
                       fn_kwargs={"skip_bad": recipe.skip_bad_rows, "report": report}))
    for name in wanted:
        spec = ExpertSpec(checkpoint=recipe.checkpoint, expert=name, key=keys[name],
                          cache=recipe.cache, dtype=recipe.dtype)
        memory = actor_memory(part_bytes(recipe.checkpoint, f"experts/{name}/"),
                              recipe.batch_size, image_item_bytes(sides[name]))
        ds = ds.map_batches(ExpertWorker, fn_constructor_kwargs={"spec": spec},
                            batch_size=recipe.batch_size,
                            **actor_pool_args(recipe.workers_per_expert, cpus,
                                              recipe.gpus_per_worker, memory))
    return ds.drop_columns(["pixels"])


def shuffle_partitions(rows: int, cpus: float | None = None) -> int:
    """Partitions of the by-image shuffle: one per ``ROWS_PER_SHUFFLE_PARTITION`` rows, at
    least one per CPU of the cluster (``cpus``; None: Ray's count). Ray Data's default, 200
    whatever the size, made 480 rows on 2 CPUs run 200 reduce tasks, one after another, for
    minutes, and would give each of 200 partitions half a million rows at 100M."""
    if cpus is None:
        cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus), math.ceil(rows / ROWS_PER_SHUFFLE_PARTITION))


def _cpus_per_worker(recipe: FeaturesRecipe, pools: int) -> float:
    """The recipe's value, or (auto) a share that lets every pool run at once while leaving
    one CPU for reading and decoding."""
    if recipe.cpus_per_worker is not None:
        return recipe.cpus_per_worker

    total = ray.cluster_resources().get("CPU", 1.0)
    spare = max(total - 1.0, total / 2)
    # rounded down: 7 pools at round(1/7, 3) = 0.143 would take 1.001 CPUs and leave the
    # read/decode tasks 0.9997 of a CPU, which is never enough; at most 1 CPU an actor, so
    # that actors packed onto one node of a cluster still leave room for the read tasks
    share = math.floor(1000 * spare / (pools * recipe.workers_per_expert)) / 1000
    return max(0.05, min(1.0, share))


def _count(summary: FeaturesSummary, batch: dict[str, np.ndarray]) -> None:
    errors = batch["error"]
    summary.images += len(errors)
    summary.bad_images += int(sum(1 for e in errors if e))
    for e in summary.experts:
        if f"s_{e.expert}" not in batch:  # not asked for (recipe.only)
            continue
        status = batch[f"s_{e.expert}"]
        e.needed += int(sum(1 for s in status if s))
        e.cached += int(sum(1 for s in status if s == "cached"))
        e.computed += int(sum(1 for s in status if s == "computed"))
        e.bytes_written += int(batch[f"b_{e.expert}"].sum())
        e.seconds += float(batch[f"t_{e.expert}"].sum())


def _compact(cache: FeatureCache, targets: list[tuple[str, str]]) -> None:
    """Merge each expert's index parts into one (Ray tasks, in parallel)."""
    if not targets:
        return

    @ray.remote(num_cpus=0.5)
    def compact(root: str, expert: str, key: str) -> int:
        return FeatureCache(root).compact(expert, key)

    entries = ray.get([compact.remote(cache.root, e, k) for e, k in targets])
    for (expert, _), n in zip(targets, entries, strict=True):
        log.info("%s: index holds %d images", expert, n)

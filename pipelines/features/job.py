"""`mova features`: compute frozen expert features once, with Ray Data, into the feature cache.

Flow: read + validate the manifest -> hash every distinct image (Ray tasks) -> per expert, the
images whose features are not cached yet -> one actor pool per expert (GPU when asked) that
decodes, preprocesses, runs the expert and writes one Parquet shard per batch, atomically.
A re-run computes only what is missing; a killed run loses at most the batches in flight.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.common import storage
from pipelines.common.ray_init import actor_pool_args
from pipelines.features.cache import FeatureCache
from pipelines.features.recipe import FeaturesRecipe

log = logging.getLogger(__name__)


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
            lines.append(f"Skipped images are listed in {self.report}")
        return "\n".join(lines)


def _hash_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Ray Data task: content hash of each image (or the reason it cannot be read)."""
    from mova.images import ImageError, image_hash, load_image

    hashes, errors = [], []
    for uri in batch["uri"]:
        try:
            hashes.append(image_hash(load_image(storage.read_bytes(str(uri)))))
            errors.append("")
        except (ImageError, FileNotFoundError, OSError, ValueError) as exc:
            hashes.append("")
            errors.append(str(exc))
    return {"uri": list(batch["uri"]), "image_hash": hashes, "error": errors}


class ExpertWorker:
    """Ray Data actor: one frozen expert, loaded once, writing one cache shard per batch."""

    def __init__(self, checkpoint: str, expert: str, key: str, cache: str, dtype: str) -> None:
        import torch

        from mova.checkpoint import load_expert

        self.model, self.resolved, loaded_key = load_expert(checkpoint, expert)
        if loaded_key != key:
            raise RuntimeError(f"expert {expert!r} in {checkpoint} changed while the job ran")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            self.model.to(self.device, torch.bfloat16)
        self.name, self.key, self.dtype = expert, key, dtype
        self.cache = FeatureCache(cache)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        from mova.experts.preprocess import expert_input
        from mova.images import load_image

        start = time.perf_counter()
        uris = [str(u) for u in batch["uri"]]
        hashes = [str(h) for h in batch["image_hash"]]
        inputs = torch.stack([expert_input(load_image(storage.read_bytes(u)), self.resolved)
                              for u in uris])
        param = next(self.model.parameters())
        if inputs.is_floating_point():
            inputs = inputs.to(self.device, param.dtype)
        with torch.inference_mode():
            feats = self.model(inputs)
        _, nbytes = self.cache.write_shard(self.name, self.key, hashes, feats, self.dtype)
        return {"images": [len(uris)], "bytes": [nbytes],
                "seconds": [time.perf_counter() - start]}


def plan_work(samples, mode: str, pool: list[str], only: list[str],
              manifest: str) -> dict[str, set[str]]:
    """image URI -> experts whose features it needs."""
    from pipelines.data.manifest import resolve_image

    wanted = [e for e in pool if not only or e in only]
    unknown = sorted(set(only) - set(pool))
    if unknown:
        raise ValueError(f"features recipe: only={unknown} are not in the checkpoint's pool "
                         f"{pool}")
    needs: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        if not s.image:
            continue
        experts = wanted if mode == "all" or s.experts is None else \
            [e for e in s.experts if e in wanted]
        needs[resolve_image(manifest, s.image)].update(experts)
    return needs


def run_features(recipe: FeaturesRecipe) -> FeaturesSummary:
    """Run the feature-cache job; returns what it did."""
    import ray

    from mova.checkpoint import expert_cache_keys, load_config
    from pipelines.common.ray_init import init_ray
    from pipelines.data.manifest import load_manifest

    start = time.perf_counter()
    config = load_config(recipe.checkpoint)
    keys = expert_cache_keys(recipe.checkpoint)
    samples = load_manifest(recipe.manifest, pool=config.expert_names, check_images=False,
                            skip_bad_rows=recipe.skip_bad_rows, report_uri=recipe.report)
    needs = plan_work(samples, recipe.experts, config.expert_names, recipe.only, recipe.manifest)
    log.info("%d samples, %d distinct image files", len(samples), len(needs))
    init_ray(recipe.ray.address, num_cpus=recipe.ray.num_cpus,
             object_store_memory=recipe.ray.object_store_memory, temp_dir=recipe.ray.temp_dir)
    hashed = (ray.data.from_items([{"uri": u} for u in sorted(needs)])
              .map_batches(_hash_batch, batch_size=64).take_all()) if needs else []
    bad = [r for r in hashed if r["error"]]
    if bad and not recipe.skip_bad_rows:
        lines = "\n".join(f"  {r['uri']}: {r['error']}" for r in bad[:20])
        raise ValueError(f"{len(bad)} image(s) cannot be read (use skip_bad_rows=true to skip "
                         f"and report them):\n{lines}")
    report = None
    if bad:
        report = recipe.report or storage.join(recipe.cache, "_reports",
                                               f"features-{int(time.time())}.jsonl")
        storage.write_text_atomic(report, "".join(
            json.dumps({"image": r["uri"], "error": r["error"]}) + "\n" for r in bad))
        log.warning("skipped %d unreadable images; see %s", len(bad), report)
    cache = FeatureCache(recipe.cache)
    summary = FeaturesSummary(images=len(hashed), bad_images=len(bad), cache=recipe.cache,
                              report=report)
    good = [r for r in hashed if not r["error"]]
    for name in config.expert_names:
        summary.experts.append(
            _run_expert(recipe, cache, name, keys[name], good, needs))
    summary.seconds = time.perf_counter() - start
    return summary


def _run_expert(recipe: FeaturesRecipe, cache: FeatureCache, name: str, key: str,
                hashed: list[dict], needs: dict[str, set[str]]) -> ExpertSummary:
    import ray

    result = ExpertSummary(expert=name, key=key)
    todo: dict[str, str] = {}
    wanted: set[str] = set()
    for row in hashed:
        if name in needs[row["uri"]]:
            wanted.add(row["image_hash"])
            todo.setdefault(row["image_hash"], row["uri"])
    result.needed = len(wanted)
    if not wanted:
        return result
    cache.describe(name, key, {"expert": name, "key": key, "checkpoint": recipe.checkpoint})
    index = cache.index(name, key, refresh=True)
    missing = [{"uri": uri, "image_hash": h} for h, uri in sorted(todo.items()) if h not in index]
    result.cached = result.needed - len(missing)
    if not missing:
        log.info("%s: all %d features already cached", name, result.needed)
        return result
    log.info("%s: computing %d features (%d cached)", name, len(missing), result.cached)
    start = time.perf_counter()
    rows = (
        ray.data.from_items(missing)
        .map_batches(
            ExpertWorker,
            fn_constructor_kwargs={"checkpoint": recipe.checkpoint, "expert": name, "key": key,
                                   "cache": recipe.cache, "dtype": recipe.dtype},
            batch_size=recipe.batch_size,
            **actor_pool_args(recipe.workers_per_expert, recipe.cpus_per_worker,
                              recipe.gpus_per_worker),
        )
        .take_all()
    )
    result.seconds = time.perf_counter() - start
    result.computed = int(sum(r["images"] for r in rows))
    result.bytes_written = int(sum(r["bytes"] for r in rows))
    return result

"""`mova bench features`: the Ray Data feature-cache job against a plain PyTorch loop.

Both compute the same tiny expert's features for the same synthetic images and write them with
:meth:`FeatureCache.write_shard`: (a) one process, batch by batch (decode, hash, preprocess with
``expert_input``, run the expert, write a shard); (b) :func:`pipelines.features.job.run_features` on
a fresh cache. Ray's fixed start-up (``ray.init``, the hashing stage's workers, the expert
actor's start) is separated from its steady throughput by timing the job on the full manifest
and on a quarter of it with Ray already running: the difference is the marginal cost of the
extra images. (c) A re-run on a complete cache measures the zero-work path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from mova.checkpoint import load_expert
from mova.experts.preprocess import expert_input
from mova.experts.registry import DEFAULT_POOL
from mova.images import image_hash, load_image
from pipelines.bench.harness import machine_info
from pipelines.bench.real import (
    check_expert,
    relabel,
    save_checkpoint,
)
from pipelines.common import storage
from pipelines.common.feature_cache import FeatureCache
from pipelines.common.manifests.validate import load_manifest, resolve_image
from pipelines.common.ray_init import prepare_env
from pipelines.data.synth import SynthRecipe, generate
from pipelines.data.synth_domains import DOMAINS
from pipelines.features.job import run_features
from pipelines.features.recipe import FeaturesRecipe

log = logging.getLogger(__name__)

DEFAULT_EXPERT = "dinov2"
SMALL_FRACTION = 4  # the small manifest holds 1/SMALL_FRACTION of the images


# ---- the workspace: synthetic images and a tiny checkpoint -----------------------------------
def make_workspace(root: str | Path, images: int, *, image_size: int = 128, seed: int = 0,
                   routing_samples: int = 0, real: bool = False) -> tuple[str, str]:
    """Write ``images`` synthetic samples (split over the 4 domains) and a tiny MoVA checkpoint
    under ``root``; returns (train manifest, checkpoint folder). ``real``: the checkpoint has
    the real DINOv2-S, SmolLM2 and MiniLM (:mod:`pipelines.bench.real`) and every answer row
    routes ``dinov2``."""
    if images < 1:
        raise ValueError(f"images={images} must be >= 1")
    root = Path(root)
    per_domain = -(-images // len(DOMAINS))
    result = generate(SynthRecipe(out=str(root / "data"), seed=seed, per_domain=per_domain,
                                  test_per_domain=0, image_size=image_size,
                                  routing_samples=routing_samples))
    # Domains interleaved, so any prefix (the small manifest, a few steps) mixes them.
    by_domain: dict[str, list[str]] = {d: [] for d in DOMAINS}
    routing = []
    for line in result.train_manifest.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "routing":
            routing.append(line)
        else:
            by_domain[row["domain"]].append(json.dumps(relabel(row)) if real else line)
    answers = [rows[i] for i in range(per_domain) for rows in by_domain.values()][:images]
    result.train_manifest.write_text("\n".join(answers + routing) + "\n")
    checkpoint = save_checkpoint(root / "checkpoint", real=real, seed=seed)
    return str(result.train_manifest), checkpoint


def subset_manifest(manifest: str, count: int, name: str) -> str:
    """The first ``count`` rows of ``manifest`` as a sibling manifest (same image paths)."""
    path = Path(manifest).with_name(name)
    path.write_text("\n".join(Path(manifest).read_text().splitlines()[:count]) + "\n")
    return str(path)


def manifest_images(manifest: str) -> list[str]:
    """Distinct image URIs of a manifest, sorted (what the job plans over)."""
    samples = load_manifest(manifest, check_images=False)
    return sorted({resolve_image(manifest, s.image) for s in samples if s.image})


# ---- (a) the plain loop -------------------------------------------------------------------
@dataclass
class PlainRun:
    """One plain-loop run: ``seconds`` covers reading the manifest, loading the expert and every
    batch; ``batch_seconds`` the batches alone."""

    images: int
    seconds: float
    setup_seconds: float
    batch_seconds: list[float]
    bytes_written: int


def plain_features(uris: Sequence[str], checkpoint: str, expert: str, cache_root: str, *,
                   batch_size: int = 16, dtype: str = "float16") -> PlainRun:
    """Compute and cache ``expert``'s features of ``uris`` in this process, batch by batch:
    decode + hash, ``expert_input``, the expert, ``write_shard`` (what the Ray job's actor does,
    plus the hashing its first stage does)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    start = time.perf_counter()
    model, resolved, key = load_expert(checkpoint, expert)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        model.to(device, torch.bfloat16)  # as the job's actor does
    param = next(model.parameters())
    cache = FeatureCache(cache_root)
    cache.describe(expert, key, {"expert": expert, "key": key, "checkpoint": checkpoint})
    setup = time.perf_counter() - start
    batch_seconds, nbytes = [], 0
    for i in range(0, len(uris), batch_size):
        t0 = time.perf_counter()
        images = [load_image(storage.read_bytes(u)) for u in uris[i:i + batch_size]]
        hashes = [image_hash(im) for im in images]
        inputs = torch.stack([expert_input(im, resolved) for im in images])
        if inputs.is_floating_point():
            inputs = inputs.to(device, param.dtype)
        with torch.inference_mode():
            feats = model(inputs)
        nbytes += cache.write_shard(expert, key, hashes, feats, dtype)[1]
        batch_seconds.append(time.perf_counter() - t0)
    return PlainRun(len(uris), time.perf_counter() - start, setup, batch_seconds, nbytes)


def plain_run(manifest: str, checkpoint: str, expert: str, cache_root: str, *,
              batch_size: int, dtype: str = "float16") -> PlainRun:
    """:func:`plain_features` over a manifest; the manifest read is timed too."""
    start = time.perf_counter()
    uris = manifest_images(manifest)
    run = plain_features(uris, checkpoint, expert, cache_root, batch_size=batch_size,
                         dtype=dtype)
    read = time.perf_counter() - start - run.seconds
    return dataclasses.replace(run, seconds=run.seconds + read,
                               setup_seconds=run.setup_seconds + read)


# ---- results ----------------------------------------------------------------------------
@dataclass
class RunTiming:
    """One timed run. ``kind``: plain, ray_cold (Ray started by the job), ray (Ray already
    running), ray_small (the small manifest), ray_cached (nothing left to compute).
    ``stage_seconds``: plain: the batches; Ray: the expert's actor-pool stage (actor start +
    batches), as ``ExpertSummary.seconds``."""

    kind: str
    images: int
    computed: int
    seconds: float
    stage_seconds: float


@dataclass
class FeaturesBenchResult:
    expert: str
    images: int
    small_images: int
    batch_size: int
    workers: int
    repeats: int
    image_size: int
    dtype: str
    machine: dict[str, str] = field(default_factory=dict)
    runs: list[RunTiming] = field(default_factory=list)
    real: bool = False

    @property
    def key(self) -> str:
        """The docs section key, ``bench:features:cpu`` (``bench:features:real:cpu`` with the
        real expert; ``:workers=N`` when N != 1)."""
        device = "cuda" if self.machine.get("gpu", "none") != "none" else "cpu"
        return (f"bench:features:{'real:' if self.real else ''}{device}"
                + (f":workers={self.workers}" if self.workers != 1 else ""))

    def of(self, kind: str) -> list[RunTiming]:
        return [r for r in self.runs if r.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "throughput": throughput(self),
                "ratios": ratios(self)}


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _rate(images: float, seconds: float | None) -> float | None:
    return images / seconds if seconds and seconds > 0 else None


def throughput(r: FeaturesBenchResult) -> dict[str, float | None]:
    """Images/s from the medians of the runs (None where not measured or not positive).

    ``ray_steady`` is the marginal rate (N - n) / (stage(N) - stage(n)) of the actor-pool
    stage, which cancels every fixed cost; ``ray_fixed_s`` the stage's fixed cost (intercept).
    """
    def med(kind: str, attr: str) -> float | None:
        return _median([getattr(x, attr) for x in r.of(kind)])

    out = {
        "plain": _rate(r.images, med("plain", "seconds")),
        "plain_batches": _rate(r.images, med("plain", "stage_seconds")),
        "ray_cold": _rate(r.images, med("ray_cold", "seconds")),
        "ray": _rate(r.images, med("ray", "seconds")),
        "ray_stage": _rate(r.images, med("ray", "stage_seconds")),
        "ray_small": _rate(r.small_images, med("ray_small", "seconds")),
        "ray_steady": None, "ray_fixed_s": None,
    }
    big, small = med("ray", "stage_seconds"), med("ray_small", "stage_seconds")
    if big is not None and small is not None and r.images > r.small_images:
        out["ray_steady"] = _rate(r.images - r.small_images, big - small)
        if out["ray_steady"]:
            out["ray_fixed_s"] = big - r.images / out["ray_steady"]
    return out


RATIOS = (
    ("ray_cold", "plain", "end to end, Ray started by the job (ray.init included)"),
    ("ray", "plain", "end to end, Ray already running"),
    ("ray_stage", "plain", "expert stage (actor start + batches) vs the whole plain run"),
    ("ray_steady", "plain_batches", "steady state: marginal rate vs the plain batches"),
)


def ratios(r: FeaturesBenchResult) -> dict[str, float | None]:
    """Ray Data / plain loop throughput for each pair of :data:`RATIOS`, and the cached
    re-run's time over the computing run's (``cached_vs_compute``)."""
    tp = throughput(r)
    out = {f"{ray}/{plain}": (tp[ray] / tp[plain] if tp[ray] and tp[plain] else None)
           for ray, plain, _ in RATIOS}
    cached = _median([x.seconds for x in r.of("ray_cached")])
    compute = _median([x.seconds for x in r.of("ray")])
    out["cached_vs_compute"] = cached / compute if cached and compute else None
    return out


# ---- the benchmark ------------------------------------------------------------------------
def _ray_run(kind: str, manifest: str, checkpoint: str, cache: str, expert: str,
             batch_size: int, workers: int, dtype: str, images: int) -> RunTiming:
    recipe = FeaturesRecipe(manifest=manifest, checkpoint=checkpoint, cache=cache,
                            experts="all", only=[expert], dtype=dtype, batch_size=batch_size,
                            workers_per_expert=workers, cpus_per_worker=1.0).validate()
    start = time.perf_counter()
    summary = run_features(recipe)
    seconds = time.perf_counter() - start
    (stage,) = [e for e in summary.experts if e.expert == expert]
    if stage.needed != images:
        raise RuntimeError(f"the job planned {stage.needed} images for {expert}; expected "
                           f"{images}")
    log.info("%s: %d computed, %.2f s (stage %.2f s)", kind, stage.computed, seconds,
             stage.seconds)
    return RunTiming(kind, images, stage.computed, seconds, stage.seconds)


def _check_args(expert: str, real: bool, **counts: int) -> None:
    if expert not in DEFAULT_POOL:
        raise ValueError(f"expert={expert!r}; expected one of {list(DEFAULT_POOL)}")
    if real:
        check_expert(expert)
    for name, value in counts.items():
        low = 2 if name == "images" else 1
        if value < low:
            raise ValueError(f"{name}={value} must be >= {low}")


def bench_features(workdir: str | Path, *, images: int = 4096, expert: str = DEFAULT_EXPERT,
                   batch_size: int = 16, workers: int = 1, repeats: int = 3,
                   image_size: int = 128, dtype: str = "float16", seed: int = 0,
                   real: bool = False, extras: bool = True) -> FeaturesBenchResult:
    """Run the whole comparison under ``workdir`` (which receives data, checkpoint and caches);
    ``real``: with the real DINOv2-S checkpoint (:mod:`pipelines.bench.real`); ``extras``: also
    the runs on the small manifest (without them no steady rate is measured) and the cached
    re-run.

    Order: an untimed plain warm-up batch; the cold Ray run if Ray is not running yet (the
    job then starts it; shut down at the end); ``repeats`` rounds of plain / Ray on the full
    manifest / Ray on the small one; a cached re-run.
    """
    _check_args(expert, real, images=images, batch_size=batch_size, workers=workers,
                repeats=repeats)
    prepare_env()
    root = Path(workdir)
    manifest, checkpoint = make_workspace(root, images, image_size=image_size, seed=seed,
                                          real=real)
    small_count = max(1, images // SMALL_FRACTION) if extras else 0
    small_manifest = subset_manifest(manifest, small_count, "small.jsonl") if extras else ""
    result = FeaturesBenchResult(expert, images, small_count, batch_size, workers, repeats,
                                 image_size, dtype, real=real)
    uris = manifest_images(manifest)
    if len(uris) != images:
        raise RuntimeError(f"{manifest} has {len(uris)} distinct images; expected {images}")
    plain_features(uris[:batch_size], checkpoint, expert, str(root / "cache-warmup"),
                   batch_size=batch_size, dtype=dtype)  # imports and first-call costs
    counter = iter(range(10**6))

    def cache_dir(kind: str) -> str:
        return str(root / f"cache-{kind}-{next(counter)}")

    def ray_run(kind: str, path: str, count: int, cache: str | None = None) -> RunTiming:
        return _ray_run(kind, path, checkpoint, cache or cache_dir(kind), expert, batch_size,
                        workers, dtype, count)

    def plain(path: str) -> RunTiming:
        run = plain_run(path, checkpoint, expert, cache_dir("plain"), batch_size=batch_size,
                        dtype=dtype)
        return RunTiming("plain", images, images, run.seconds, sum(run.batch_seconds))

    _rounds(result, manifest, small_manifest, ray_run, plain, cache_dir)
    return result


def _rounds(result: FeaturesBenchResult, manifest: str, small_manifest: str,
            ray_run: Callable[..., RunTiming], plain: Callable[[str], RunTiming],
            cache_dir: Callable[[str], str]) -> None:
    """The timed runs, in order, on a Ray this function starts (and stops) if none runs."""
    started = not ray.is_initialized()
    load_start = os.getloadavg()[0]
    try:
        if started:
            result.runs.append(ray_run("ray_cold", manifest, result.images))
        last = ""
        for _ in range(result.repeats):
            result.runs.append(plain(manifest))
            last = cache_dir("ray")
            result.runs.append(ray_run("ray", manifest, result.images, last))
            if result.small_images:
                result.runs.append(ray_run("ray_small", small_manifest, result.small_images))
        if result.small_images:  # (the extras)
            result.runs.append(ray_run("ray_cached", manifest, result.images, last))
        result.machine = machine_info(torch.device("cpu"))
        result.machine["load average (1 min) before/after"] = (
            f"{load_start:.1f}/{os.getloadavg()[0]:.1f}")
        result.machine["Ray CPUs"] = str(int(ray.cluster_resources().get("CPU", 0)))
    finally:
        if started:
            ray.shutdown()

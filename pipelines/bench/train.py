"""`mova bench train`: training steps with cached expert features vs experts run every step,
and the Ray Train + DeepSpeed loop per ZeRO stage.

In-process part (one process, no Ray): the same synthetic samples are prepared by
:func:`pipelines.common.batches.prepare_batch` (the function ``build_dataset`` maps over the
manifest) with ``features=cached`` and ``features=compute``, once with each sample's routing
label (1-2 experts) and once with every expert of the pool routed; batches are made with
:func:`pipelines.common.batches.collate`. Each configuration has its own model and AdamW, and the
four are stepped in interleaved rounds (``model(**batch)``, backward, ``optimizer.step``); the first
step of each is a warm-up and is not timed. Ray part: :func:`pipelines.train.job.run_train` with 2
workers for each ZeRO stage, timed from the loop's own per-step MLflow records.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from mlflow.tracking import MlflowClient

from mova.checkpoint import load_config
from mova.factory import from_pretrained
from mova.training import set_stage, trainable_parameters
from pipelines.bench.features import make_workspace, plain_features
from pipelines.bench.harness import machine_info
from pipelines.bench.real import expert_cost
from pipelines.common.batches import PrepareSpec, collate, prepare_rows
from pipelines.common.manifests.validate import load_manifest, resolve_image
from pipelines.common.ray_init import prepare_env
from pipelines.common.recipe import MlflowConfig, RayConfig
from pipelines.train.job import run_train
from pipelines.train.recipe import DeepSpeedConfig, TrainRecipe

log = logging.getLogger(__name__)

MASKS = ("label", "all", "none")  # none: no expert routed at all (the floor of a step)
FEATURES = ("cached", "compute")
ZERO_WORKERS = 2
ZERO_CPUS_PER_WORKER = 0.5  # leaves Ray Data a CPU on a 2-CPU Ray (1.0 each starves it)


@dataclass
class ConfigTiming:
    """One in-process configuration: ``step_ms`` and ``tokens`` of each timed step."""

    masks: str
    features: str
    step_ms: list[float]
    tokens: list[int]
    experts_per_sample: float
    prepare_ms_per_sample: float
    collate_ms: float
    expert_ms: list[float] = field(default_factory=list)  # compute: routed experts' forward

    @property
    def steps_per_s(self) -> float:
        return 1000.0 * len(self.step_ms) / sum(self.step_ms)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * sum(self.tokens) / sum(self.step_ms)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.step_ms))


@dataclass
class ZeroTiming:
    """One ``run_train`` run. The loop records metrics every ``log_every`` steps and at the
    last; ``loop_seconds`` spans the first and the last record, ``steps`` the optimizer steps
    between them (the warm-up before the first record is left out); ``tokens_per_s`` is the
    median of the loop's own ``tokens_per_s`` metric (all workers) over the records after the
    first."""

    zero_stage: int
    log_every: int
    workers: int
    batch_size: int
    steps: int
    loop_seconds: float
    steps_per_s: float
    tokens_per_s: float
    wall_seconds: float
    final_loss: float | None


@dataclass
class TrainBenchResult:
    steps: int
    batch_size: int
    stage: str
    samples: int
    image_size: int
    log_every: int = 5
    machine: dict[str, str] = field(default_factory=dict)
    configs: list[ConfigTiming] = field(default_factory=list)
    zero: list[ZeroTiming] = field(default_factory=list)
    real: bool = False

    @property
    def key(self) -> str:
        device = "cuda" if self.machine.get("gpu", "none") != "none" else "cpu"
        return f"bench:train:{'real:' if self.real else ''}{device}"

    def config(self, masks: str, features: str) -> ConfigTiming:
        for c in self.configs:
            if (c.masks, c.features) == (masks, features):
                return c
        raise ValueError(f"no timing for masks={masks!r}, features={features!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for c, d in zip(self.configs, data["configs"], strict=True):
            d.update(steps_per_s=c.steps_per_s, tokens_per_s=c.tokens_per_s,
                     median_ms=c.median_ms)

        return {**data, "speedups": speedups(self), "expert_cost": expert_cost(self)}


def speedups(r: TrainBenchResult) -> dict[str, dict[str, float]]:
    """Per mask variant: cached / compute steps per second (from the total time of the timed
    steps) and the same from the median step times."""
    out = {}
    for masks in MASKS:
        try:
            cached, compute = r.config(masks, "cached"), r.config(masks, "compute")
        except ValueError:
            continue
        out[masks] = {"steps_per_s": cached.steps_per_s / compute.steps_per_s,
                      "median": compute.median_ms / cached.median_ms}
    return out


def cached_over_no_experts(r: TrainBenchResult) -> float | None:
    """A step with the label experts' cached features over a step routing no expert (median
    step times): how close the cache brings the experts to free."""
    try:
        return r.config("label", "cached").median_ms / r.config("none", "cached").median_ms
    except ValueError:
        return None


# ---- data -----------------------------------------------------------------------------------
def manifest_rows(manifest: str, masks: str, pool: Sequence[str]) -> list[Any]:
    """The samples training prepares, all experts routed when ``masks == "all"``."""
    if masks not in MASKS:
        raise ValueError(f"masks={masks!r}; expected one of {MASKS}")
    samples = load_manifest(manifest, pool=pool, check_images=False)
    if masks != "label":
        routed = list(pool) if masks == "all" else []
        samples = [dataclasses.replace(s, experts=routed) for s in samples]
    return samples


def fill_cache(manifest: str, checkpoint: str, cache: str, rows_all: int,
               batch_size: int = 16) -> None:
    """Cache, in this process, each sample's label experts and all experts of the first
    ``rows_all`` samples (what the cached configurations and the ZeRO runs read)."""
    pool = load_config(checkpoint).expert_names
    label = manifest_rows(manifest, "label", pool)
    for name in pool:
        uris = sorted({resolve_image(manifest, row.image) for i, row in enumerate(label)
                       if i < rows_all or name in (row.experts or pool)})
        if uris:
            plain_features(uris, checkpoint, name, cache, batch_size=batch_size)


def prepared_rows(manifest: str, checkpoint: str, cache: str, masks: str, features: str,
                  count: int) -> tuple[dict[str, list], float]:
    """The first ``count`` samples prepared as training prepares them (``prepare_rows``);
    returns (columns, seconds)."""
    rows = [(manifest, s) for s in
            manifest_rows(manifest, masks, load_config(checkpoint).expert_names)[:count]]
    spec = PrepareSpec(checkpoint=checkpoint, cache=cache, features=features, max_length=None)
    prepare_rows(rows[:1], spec)  # tokenizers, cache index
    start = time.perf_counter()
    prepared = prepare_rows(rows, spec)
    seconds = time.perf_counter() - start
    return {k: [p[k] for p in prepared] for k in prepared[0]}, seconds


# ---- in-process timing ------------------------------------------------------------------------
def bench_in_process(manifest: str, checkpoint: str, cache: str, *, steps: int, batch_size: int,
                     stage: str = "pretrain", lr: float = 2e-4) -> list[ConfigTiming]:
    """Time ``steps`` optimizer steps (after one warm-up step) of each (masks, features)
    configuration, interleaved round by round; after each compute step, the routed experts'
    forward alone on the same batch (``routed_expert_features``, as the step runs it)."""
    count = batch_size * (steps + 1)
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for masks in MASKS:
        for features in FEATURES[:1] if masks == "none" else FEATURES:
            columns, seconds = prepared_rows(manifest, checkpoint, cache, masks, features, count)
            n = len(columns["id"])
            model = from_pretrained(checkpoint)
            set_stage(model, stage)
            model.train()
            batches, collate_s = [], []
            for s in range(steps + 1):
                idx = [(s * batch_size + j) % n for j in range(batch_size)]
                t0 = time.perf_counter()
                batches.append(collate({k: [v[i] for i in idx] for k, v in columns.items()},
                                       model.expert_names, model.tokenizer.pad_token_id,
                                       features))
                collate_s.append(time.perf_counter() - t0)
            runs[(masks, features)] = {
                "model": model, "batches": batches, "step_ms": [], "tokens": [], "expert_ms": [],
                "optimizer": torch.optim.AdamW(trainable_parameters(model), lr=lr),
                "prepare_ms": 1000.0 * seconds / n,
                "collate_ms": 1000.0 * statistics.median(collate_s),
                "experts": float(torch.stack([b["expert_mask"].float().sum(1)
                                              for b in batches]).mean()),
            }
    keys = list(runs)
    for s in range(steps + 1):
        for key in keys[s % len(keys):] + keys[:s % len(keys)]:
            run, batch = runs[key], runs[key]["batches"][s]
            start = time.perf_counter()
            run["optimizer"].zero_grad(set_to_none=True)
            out = run["model"](**batch)
            out.loss.backward()
            run["optimizer"].step()
            elapsed = time.perf_counter() - start
            if key[1] == "compute":
                mask = batch["expert_mask"].bool() & ~batch["routing_rows"].bool()[:, None]
                start = time.perf_counter()
                run["model"].routed_expert_features(batch["expert_inputs"], mask)
                if s:
                    run["expert_ms"].append(1000.0 * (time.perf_counter() - start))
            if s:  # the first step of each configuration is a warm-up
                run["step_ms"].append(1000.0 * elapsed)
                run["tokens"].append(int(batch["attention_mask"].sum()))
    return [ConfigTiming(m, f, run["step_ms"], run["tokens"], run["experts"],
                         run["prepare_ms"], run["collate_ms"], run["expert_ms"])
            for (m, f), run in runs.items()]


# ---- Ray Train per ZeRO stage -----------------------------------------------------------------
def zero_run(zero_stage: int, manifest: str, checkpoint: str, cache: str, workdir: str | Path,
             *, steps: int, batch_size: int, stage: str = "pretrain",
             log_every: int = 1) -> ZeroTiming:
    """One ``run_train`` (2 workers, ``steps + 1`` optimizer steps, cached features). The
    loop reports (MLflow + ``ray.train.report``) every ``log_every`` steps and at the end."""
    root = Path(workdir).resolve()
    tag = f"zero{zero_stage}-{uuid.uuid4().hex[:8]}"
    recipe = TrainRecipe(
        stage=stage, init_from=checkpoint, manifest=manifest, cache=cache, features="cached",
        output=str(root / "models" / tag), name=f"bench-{tag}",
        storage_path=str(root / "ray_results"), num_workers=ZERO_WORKERS,
        cpus_per_worker=ZERO_CPUS_PER_WORKER, deepspeed=DeepSpeedConfig(zero_stage=zero_stage),
        batch_size=batch_size, max_steps=steps + 1, checkpoint_every=10**6,
        keep_checkpoints=1, log_every=log_every, max_failures=0,
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                            experiment="bench-train", system_metrics=False),
        ray=RayConfig()).validate()
    start = time.perf_counter()
    result = run_train(recipe)
    wall = time.perf_counter() - start
    history = sorted(MlflowClient(result.tracking_uri).get_metric_history(
        result.mlflow_run_id, "tokens_per_s"), key=lambda m: m.step)
    if len(history) < 2:
        raise RuntimeError(f"ZeRO-{zero_stage}: {len(history)} step record(s); expected "
                           f"{steps + 1}")
    span = (history[-1].timestamp - history[0].timestamp) / 1000.0
    timed = history[1:]
    count = history[-1].step - history[0].step
    return ZeroTiming(zero_stage, log_every, ZERO_WORKERS, batch_size, count, span,
                      count / span if span > 0 else float("nan"),
                      float(statistics.median(m.value for m in timed)), wall,
                      result.final_loss)


# ---- the benchmark ----------------------------------------------------------------------------
def bench_train(workdir: str | Path, *, steps: int = 20, batch_size: int = 8,
                zero_stages: Sequence[int] = (1, 2, 3), log_every: int = 5,
                report_check: bool = True, stage: str = "pretrain", image_size: int = 128,
                seed: int = 0, real: bool = False) -> TrainBenchResult:
    """Make the workspace (enough samples for ``steps + 1`` steps on each of 2 workers), fill
    the cache in-process, time the in-process configurations, then each ZeRO stage with the
    loop reporting every ``log_every`` steps; ``report_check`` adds a run of the first stage
    reporting every step (the shipped recipes' ``log_every: 1``) to show that cost. ``real``:
    the real SmolLM2 / MiniLM / DINOv2-S checkpoint, every answer row routing ``dinov2``."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if any(z not in (0, 1, 2, 3) for z in zero_stages):
        raise ValueError(f"zero_stages={list(zero_stages)}; expected some of 0, 1, 2, 3")
    root = Path(workdir)
    samples = ZERO_WORKERS * batch_size * (steps + 1)
    manifest, checkpoint = make_workspace(root, samples, image_size=image_size, seed=seed,
                                          real=real)
    cache = str(root / "features")
    fill_cache(manifest, checkpoint, cache, rows_all=batch_size * (steps + 1))
    result = TrainBenchResult(steps, batch_size, stage, samples, image_size, log_every,
                              real=real)
    result.configs = bench_in_process(manifest, checkpoint, cache, steps=steps,
                                      batch_size=batch_size, stage=stage)
    result.machine = machine_info(torch.device("cpu"))
    load_start = os.getloadavg()[0]
    if zero_stages:
        prepare_env()
        started = not ray.is_initialized()
        try:
            runs = [(z, log_every) for z in zero_stages]
            if report_check and log_every != 1:
                runs.append((zero_stages[0], 1))
            for z, every in runs:
                log.info("ZeRO-%d: run_train with %d workers, log_every=%d", z, ZERO_WORKERS,
                         every)
                result.zero.append(zero_run(z, manifest, checkpoint, cache, root, steps=steps,
                                            batch_size=batch_size, stage=stage,
                                            log_every=every))
        finally:
            if started:
                ray.shutdown()
    result.machine["load average (1 min) before/after the Ray runs"] = (
        f"{load_start:.1f}/{os.getloadavg()[0]:.1f}")
    return result

"""`mova bench serve --cache`: the node's expert feature cache, measured through the Serve app.

Two copies of the app run on one local Ray, identical but for ``feature_cache`` (on, in a
fresh folder; off). One client sends one request at a time with every expert of the pool
forced (the routing decode is skipped, every expert runs) and a 1-token answer, so a request's
latency is its time to first token (TTFT). Measured, in interleaved rounds:

- cold vs repeated, on the cache-on app: a never-seen image (a miss in every expert) and one
  image seen before (a hit in every expert); goal: repeated TTFT <= 0.6x cold;
- the cost at 0% hits: each round one never-seen image goes to both apps (which one first
  alternates); goal: cache on <= 1.02x cache off.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import ray
import torch
from ray import serve

from mova.checkpoint import load_config
from mova.factory import build_tiny_mova
from pipelines.bench.harness import fmt_ms, machine_info, markdown_table
from pipelines.bench.serve import bench_inputs
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.ray_init import free_local_port, init_ray
from pipelines.common.recipe import load_recipe
from pipelines.common.wire import MoVAInfo
from pipelines.serve.app import start
from pipelines.serve.recipe import ServeRecipe

log = logging.getLogger(__name__)

GOAL_REPEATED = 0.6  # repeated TTFT / cold TTFT, at most
GOAL_OVERHEAD = 1.02  # cache-on TTFT / cache-off TTFT at 0% hits, at most
ROUNDS = {"quick": (4, 6), "full": (16, 24)}  # (cold/repeated rounds, 0%-hit rounds)
WARMUP = 3  # requests per app before timing (each replica's first call is slow)
APPS = {"on": ("cache-on", "/on"), "off": ("cache-off", "/off")}
REAL_OVERRIDES = ("limits.request_timeout_s=300", "llm.torch_threads=1")


@dataclass
class CacheBenchResult:
    machine: dict[str, str]
    settings: dict[str, Any]
    cold_ms: list[float] = field(default_factory=list)
    repeated_ms: list[float] = field(default_factory=list)
    cold_experts_ms: list[float] = field(default_factory=list)
    repeated_experts_ms: list[float] = field(default_factory=list)
    on_ms: list[float] = field(default_factory=list)
    off_ms: list[float] = field(default_factory=list)
    lookups: dict[str, dict[str, Any]] = field(default_factory=dict)

    key: str = "bench:serve:cache"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def repeated_ratio(self) -> float:
        return statistics.median(self.repeated_ms) / statistics.median(self.cold_ms)

    @property
    def overhead_ratio(self) -> float:
        return statistics.median(self.on_ms) / statistics.median(self.off_ms)


def _recipe(checkpoint: str, port: int, which: str, cache_dir: str,
            overrides: Sequence[str]) -> ServeRecipe:
    name, prefix = APPS[which]
    cache = ["feature_cache.max_mb=256", f"feature_cache.dir={cache_dir}"] if which == "on" \
        else ["feature_cache.max_mb=0"]
    return load_recipe(ServeRecipe, None, [
        f"checkpoint={checkpoint}", f"port={port}", f"app_name={name}",
        f"route_prefix={prefix}", "llm.engine=torch", "limits.max_inflight=64",
        "experts.default.num_replicas=1",
        "experts.default.autoscaling=null", *cache, *overrides])


def _ask(http: httpx.Client, url: str, uri: str, question: str,
         pool: list[str]) -> tuple[float, float]:
    """(client-side ms, the server's experts step ms) of one 1-token answer."""
    body = {"model": "mova", "max_tokens": 1, "temperature": 0, "mova": {"experts": pool},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": uri}}]}]}
    start = time.perf_counter()
    resp = http.post(f"{url}/v1/chat/completions", json=body)
    ms = (time.perf_counter() - start) * 1e3
    if resp.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
    info = MoVAInfo.from_response(resp.json())
    return ms, (info.vision_steps_ms.get("experts", math.nan) if info else math.nan)


def _measure(urls: dict[str, str], pool: list[str], inputs: list[tuple[str, str]],
             rounds: tuple[int, int], result: CacheBenchResult) -> None:
    fresh = iter(inputs)
    with httpx.Client(timeout=300) as http:
        for which in ("on", "off"):
            for _ in range(WARMUP):
                _ask(http, urls[which], *next(fresh), pool)
        seen = next(fresh)
        _ask(http, urls["on"], *seen, pool)  # stored: from now on a hit in every expert
        time.sleep(1.0)  # its features are written in the background
        for i in range(rounds[0]):
            cold = next(fresh)
            for kind in (("cold", "repeated") if i % 2 == 0 else ("repeated", "cold")):
                ms, experts = _ask(http, urls["on"], *(cold if kind == "cold" else seen), pool)
                getattr(result, f"{kind}_ms").append(ms)
                getattr(result, f"{kind}_experts_ms").append(experts)
        for i in range(rounds[1]):
            image = next(fresh)
            for which in (("on", "off") if i % 2 == 0 else ("off", "on")):
                getattr(result, f"{which}_ms").append(_ask(http, urls[which], *image, pool)[0])


def _lookups(pool: list[str]) -> dict[str, dict[str, Any]]:
    """The cache-on ingress's count of hits, misses and stored entries per expert (one
    ingress replica)."""
    handle = serve.get_deployment_handle("Ingress", app_name=APPS["on"][0])
    caches = handle.info.remote().result(timeout_s=60).get("feature_cache", {})
    return {name: caches.get(name, {}) for name in pool}


def bench_serve_cache(checkpoint: str | None = None, *, quick: bool = False, seed: int = 0,
                      port: int | None = None) -> CacheBenchResult:
    """Run both apps and measure (see the module's description); ``checkpoint`` None: the
    tiny model with the whole default pool, else that checkpoint (``--real``)."""
    rounds = ROUNDS["quick" if quick else "full"]
    result = CacheBenchResult(machine=machine_info(torch.device("cpu")),
                              settings={"quick": quick, "seed": seed, "rounds": list(rounds),
                                        "checkpoint": checkpoint or "tiny"},
                              key="bench:serve:cache" + (":real" if checkpoint else ""))
    with tempfile.TemporaryDirectory(prefix="mova-bench-serve-cache-") as tmp:
        if checkpoint is None:
            checkpoint = str(build_tiny_mova(seed=seed).save_pretrained(f"{tmp}/ckpt"))
        else:
            checkpoint = local_checkpoint(checkpoint)
        pool = load_config(checkpoint).expert_names
        port = port or free_local_port()
        overrides = REAL_OVERRIDES if result.settings["checkpoint"] != "tiny" else ()
        recipes = {w: _recipe(checkpoint, port, w, f"{tmp}/features", overrides) for w in APPS}
        need = sum(r.max_cpus(pool) for r in recipes.values())
        init_ray("local", num_cpus=max(os.cpu_count() or 2, math.ceil(need - 1e-9)),
                 temp_dir=tempfile.mkdtemp(prefix="mova-bench-serve-cache-", dir="/tmp"))
        try:
            urls = {w: start(r) for w, r in recipes.items()}
            inputs = bench_inputs(2 * WARMUP + 1 + sum(rounds), seed)
            _measure(urls, pool, inputs, rounds, result)
            result.lookups = _lookups(pool)
        finally:
            serve.shutdown()
            ray.shutdown()
    result.settings["pool"] = pool
    return result


def _verdict(value: float, goal: float) -> str:
    return f"goal <= {goal:.2f}x: {'met' if value <= goal else 'missed'}"


def render_cache(r: CacheBenchResult) -> str:
    """The markdown section (also what the CLI prints)."""
    s, pool = r.settings, r.settings.get("pool", [])
    real = s["checkpoint"] != "tiny"
    hits = sum(v.get("hits", 0) for v in r.lookups.values())
    misses = sum(v.get("misses", 0) for v in r.lookups.values())
    med = statistics.median
    rows = [["cold image (cache on: a miss in every expert)", len(r.cold_ms),
             fmt_ms(med(r.cold_ms)), fmt_ms(med(r.cold_experts_ms))],
            ["repeated image (cache on: a hit in every expert)", len(r.repeated_ms),
             fmt_ms(med(r.repeated_ms)), fmt_ms(med(r.repeated_experts_ms))],
            ["distinct images, cache off", len(r.off_ms), fmt_ms(med(r.off_ms)), ""],
            ["distinct images, cache on (0% hits)", len(r.on_ms), fmt_ms(med(r.on_ms)), ""]]
    return "\n".join([
        f"## `mova bench serve --cache`: the expert feature cache "
        f"({'real-weights checkpoint' if real else 'tiny model'} on cpu)", "",
        "Reproduce: `mova bench serve --cache" + (f" --real --checkpoint {s['checkpoint']}"
                                                 if real else "")
        + (" --quick" if s["quick"] else "") + "`", "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in r.machine.items()), "",
        "Two copies of the app on one local Ray, identical but for `feature_cache` (on, in a "
        "fresh folder; off), 1 replica per deployment. One client, one request at a time, "
        f"every expert of the pool forced ({len(pool)}: {', '.join(pool)}; no routing "
        "decode), 640x480 JPEG data URIs, 1-token answers: the latency is the time to first "
        "token (TTFT). Rounds interleave the two kinds compared (cold/repeated; cache on/off "
        "with the same never-seen image, which goes first alternating). `experts step`: the "
        "server's time for the experts (`mova.vision_steps_ms.experts`).", "",
        markdown_table(["requests", "n", "TTFT p50 ms", "experts step p50 ms"], rows), "",
        f"Repeated / cold TTFT: **{r.repeated_ratio:.2f}x** "
        f"({_verdict(r.repeated_ratio, GOAL_REPEATED)}).", "",
        f"Cost at 0% hits, cache on / off: **{r.overhead_ratio:.3f}x** "
        f"({_verdict(r.overhead_ratio, GOAL_OVERHEAD)}).", "",
        f"Lookups counted by the cache-on ingress, all experts: {hits} hits, {misses} misses "
        f"(warm-up included)."])

"""`mova bench serve --routing-mix`: experts autoscaled by Serve's default policy vs by their
routed-request rate (:mod:`pipelines.serve.autoscale`), under a skewed routing mix.

The tiny model's app with five experts, each autoscaled (0 to 3 replicas, one at start, quick
metrics and delays so a minute shows the policies' behaviour). Requests arrive at a fixed
rate (Poisson, open loop: both policies face the same offered load, so replica-seconds
compare), 80% routed to one expert and 20% to one of the four others (forced, so the mix is
exact), with short answers. The same load runs under each policy on a fresh app.
Measured: the replica-seconds the experts held (Serve's status polled every second), the
requests' p50/p95 latency and errors. Goal: fewer replica-seconds with the routed policy at
an equal or better p95.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray
import torch
from ray import serve

from mova.factory import build_tiny_mova
from pipelines.bench.harness import machine_info, markdown_table
from pipelines.bench.serve_overload import image_uri
from pipelines.common.ray_init import free_local_port, init_ray
from pipelines.common.recipe import load_recipe
from pipelines.serve.app import expert_deployment_name, start
from pipelines.serve.recipe import ServeRecipe

log = logging.getLogger(__name__)

HOT, COLD = "dinov2", ["sam", "vary", "deplot", "biomedclip"]
HOT_SHARE = 0.8
RATE_PER_S = 4.0  # offered load, requests per second (the app answers ~7/s here)
REQUEST_TIMEOUT_S = 30.0
AUTOSCALING = ("{{min_replicas: 0, max_replicas: 3, initial_replicas: 1, metrics_interval_s: 1, "
               "look_back_period_s: 5, upscale_delay_s: 2, downscale_delay_s: 5, "
               "downscale_to_zero_delay_s: 10, policy: {policy}}}")


@dataclass
class RoutingBenchResult:
    machine: dict[str, str]
    settings: dict[str, Any]
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    key: str = "bench:serve:routing-mix"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReplicaClock(threading.Thread):
    """Polls Serve's status each second: replica-seconds per expert deployment."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="replica-clock")
        self.seconds: dict[str, float] = {n: 0.0 for n in [HOT, *COLD]}
        self.peak: dict[str, int] = {n: 0 for n in self.seconds}
        self._stop_event = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self._stop_event.wait(1.0):
            now = time.monotonic()
            deployments = serve.status().applications["mova"].deployments
            for name in self.seconds:
                running = deployments[expert_deployment_name(name)].replica_states.get(
                    "RUNNING", 0)
                self.seconds[name] += running * (now - last)
                self.peak[name] = max(self.peak[name], running)
            last = now

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


async def _load(url: str, seconds: float, seed: int,
                rate: float = RATE_PER_S) -> tuple[list[float], dict[str, int]]:
    """Open-loop load: requests arrive at ``rate`` per second (Poisson), whatever the app's
    pace, so both policies face the same offered load and answer the same requests."""
    images = [image_uri(i) for i in range(40)]
    rng = random.Random(seed)
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def one(http: httpx.AsyncClient, expert: str, image: str) -> None:
        body = {"model": "mova", "max_tokens": 4, "temperature": 0,
                "mova": {"experts": [expert]}, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": image}}]}]}
        start = time.monotonic()
        try:
            resp = await http.post("/v1/chat/completions", json=body)
            status = str(resp.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        statuses[status] = statuses.get(status, 0) + 1
        if status == "200":
            latencies.append(time.monotonic() - start)
        else:
            log.info("routing-mix: %s for a request routed to %s", status, expert)

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S,
                                 limits=limits) as http:
        tasks = []
        stop_at = time.monotonic() + seconds
        due = time.monotonic()
        while due < stop_at:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            expert = HOT if rng.random() < HOT_SHARE else rng.choice(COLD)
            tasks.append(asyncio.create_task(one(http, expert, rng.choice(images))))
            due += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return latencies, statuses


def _run_policy(checkpoint: str, policy: str, seconds: float, seed: int,
                port: int) -> dict[str, Any]:
    recipe = load_recipe(ServeRecipe, None, [
        f"checkpoint={checkpoint}", f"port={port}", "llm.engine=torch",
        f"limits.request_timeout_s={REQUEST_TIMEOUT_S:g}", "limits.max_inflight=64",
        f"experts.default.autoscaling={AUTOSCALING.format(policy=policy)}"])
    url = start(recipe)
    try:
        asyncio.run(_load(url, 5.0, seed + 1))  # warm-up
        clock = ReplicaClock()
        clock.start()
        latencies, statuses = asyncio.run(_load(url, seconds, seed))
        clock.stop()
    finally:
        serve.delete("mova")
    latencies.sort()
    return {"replica_seconds": round(sum(clock.seconds.values()), 1),
            "hot_replica_seconds": round(clock.seconds[HOT], 1),
            "cold_replica_seconds": round(sum(clock.seconds[n] for n in COLD), 1),
            "hot_peak_replicas": clock.peak[HOT], "answers": len(latencies),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies
            else None,
            "errors": sum(n for s, n in statuses.items() if s != "200"),
            "statuses": dict(sorted(statuses.items()))}


def bench_serve_routing(*, seconds: float = 60.0, seed: int = 0) -> RoutingBenchResult:
    result = RoutingBenchResult(machine=machine_info(torch.device("cpu")), settings={
        "seconds": seconds, "rate_per_s": RATE_PER_S, "hot": HOT, "hot_share": HOT_SHARE,
        "cold": COLD, "seed": seed})
    with tempfile.TemporaryDirectory(prefix="mova-bench-routing-") as tmp:
        checkpoint = str(build_tiny_mova(seed=seed, experts=[HOT, *COLD]).save_pretrained(
            Path(tmp) / "ckpt"))
        init_ray("local", num_cpus=os.cpu_count() or 2,
                 temp_dir=tempfile.mkdtemp(prefix="mova-bench-routing-", dir="/tmp"))
        try:
            port = free_local_port()  # Serve's proxy keeps the port it started on
            for policy in ("serve", "routed"):
                result.policies[policy] = _run_policy(checkpoint, policy, seconds, seed, port)
                log.info("policy %s: %s", policy, result.policies[policy])
        finally:
            serve.shutdown()
            ray.shutdown()
    return result


def render_routing(result: RoutingBenchResult) -> str:
    machine = "; ".join(f"{k}: {v}" for k, v in result.machine.items())
    cols = ["replica_seconds", "hot_replica_seconds", "cold_replica_seconds",
            "hot_peak_replicas", "answers", "p50_s", "p95_s", "errors"]
    rows = [[policy, *(row[c] for c in cols)] for policy, row in result.policies.items()]
    default, routed = result.policies.get("serve", {}), result.policies.get("routed", {})
    ratio = (routed["replica_seconds"] / default["replica_seconds"]
             if default.get("replica_seconds") else float("nan"))
    p95_ok = (routed.get("p95_s") or 1e9) <= (default.get("p95_s") or 0) * 1.0
    met = ratio < 1 and p95_ok and routed.get("errors") == 0
    s = result.settings
    return "\n".join([
        "## `mova bench serve --routing-mix`: experts scaled by routed rate vs Serve's default",
        "", "Reproduce: `mova bench serve --routing-mix`", "", f"Machine: {machine}", "",
        f"The tiny model's app, experts {s['hot']} and {', '.join(s['cold'])} autoscaled "
        "0-3 replicas (1 at start; metrics each 1 s over 5 s, up after 2 s, down after 5 s, "
        f"to zero after 10 s). Requests arrive at {s['rate_per_s']:g}/s (Poisson, open loop: "
        f"both policies face the same offered load) for {s['seconds']:g} s, "
        f"{s['hot_share']:.0%} forced to {s['hot']}, the rest to one of the others; 4-token "
        "answers. `serve`: Serve's default policy (ongoing requests per "
        "replica); `routed`: `pipelines.serve.autoscale` (routed rate x service time).", "",
        markdown_table(["policy", *cols], rows), "",
        "Statuses: " + "; ".join(f"{policy} {row.get('statuses')}"
                                 for policy, row in result.policies.items()) + ".", "",
        f"Replica-seconds, routed / default: **{ratio:.2f}x**; p95 "
        f"{routed.get('p95_s')} s vs {default.get('p95_s')} s (goal: fewer replica-seconds "
        f"at an equal or better p95, no error: **{'met' if met else 'missed'}**).", ""])

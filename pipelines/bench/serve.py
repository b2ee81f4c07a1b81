"""`mova bench serve`: the Serve app under load, side by side with the reference-style server.

The reference (the released code's way) answers one request at a time in one process:
``model.generate`` at batch size 1, each request waiting for the previous one. The Serve app
runs every part in its own replicas and batches concurrent requests. Both get the same closed-
loop clients (each sends its next request when the previous answer arrives) at 1, 4, 8 and 16
concurrent clients, the same JPEG data-URI images, questions and greedy decoding. Then the
cost of k forced experts against all of them, and the memory of each deployment.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
import ray
import torch
from PIL import Image
from ray import serve

from mova.checkpoint import load_config
from mova.factory import build_tiny_mova
from mova.routing_constraint import constrained_routing_params, use_constrained_routing
from pipelines.bench.harness import (
    IMAGE_SIZE,
    machine_info,
    peak_memory_mib,
)
from pipelines.common.ray_init import free_local_port, init_ray
from pipelines.common.recipe import load_recipe
from pipelines.common.wire import MoVAInfo
from pipelines.serve.app import start
from pipelines.serve.recipe import ServeRecipe

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 8, 16)
QUESTIONS = ("How many people are in the picture?", "Which bar in the chart is the highest?",
             "What is written on the sign?", "Where exactly is the red car?")
# k forced experts: none, the costliest one, the three costliest (see `mova bench model`), all.
EXPERT_SETS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("0", ()), ("1", ("codetr",)), ("3", ("vary", "codetr", "sam")), ("all", None))
MAX_DIFFER = 3  # differing answers kept per load level


@dataclass
class LoadResult:
    """One closed-loop load level."""

    clients: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int = 0
    identical: int = 0
    vision_ms: list[float] = field(default_factory=list)
    steps_ms: list[dict[str, float]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    engine: str = ""  # the served app's LLM engine ("" for the in-process loop)
    # the first few served answers that differ from the loop's: (input, served, loop)
    differ: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float, values: Sequence[float] | None = None) -> float:
        values = self.latencies_ms if values is None else values
        return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class ServeBenchResult:
    machine: dict[str, str]
    settings: dict[str, Any]
    reference: list[LoadResult] = field(default_factory=list)
    served: list[LoadResult] = field(default_factory=list)
    experts: dict[str, list[LoadResult]] = field(default_factory=dict)
    memory_mib: dict[str, float] = field(default_factory=dict)
    reference_peak_rss_mib: float = 0.0
    replica_batches: dict[str, Any] = field(default_factory=dict)
    real: dict[str, Any] = field(default_factory=dict)

    key: str = "bench:serve:tiny:cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_inputs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(JPEG data URI, question) pairs: smooth synthetic images of :data:`IMAGE_SIZE`."""
    rng = np.random.default_rng(seed)
    w, h = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    out = []
    for i in range(count):
        a, b, c = rng.uniform(1, 6, 3)
        rgb = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy)])
        pixels = ((rgb.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        out.append((uri, QUESTIONS[i % len(QUESTIONS)]))
    return out


def requests_for(clients: int, quick: bool) -> int:
    return max(8, 2 * clients) if quick else max(16, 4 * clients)


# ---- the reference: one process, batch size 1, one request at a time -----------------------
def run_reference(model, inputs: list[tuple[str, str]], levels: Sequence[int], *,
                  max_new_tokens: int, quick: bool) -> tuple[list[LoadResult], dict[int, str]]:
    lock = threading.Lock()
    answers: dict[int, str] = {}

    def call(i: int) -> float:
        uri, question = inputs[i % len(inputs)]
        start = time.perf_counter()
        with lock:
            out = model.generate([uri], [question], max_new_tokens=max_new_tokens)[0]
        answers.setdefault(i % len(inputs), out.answer)
        return (time.perf_counter() - start) * 1e3

    call(0)  # warm-up
    answers.clear()
    results = []
    for clients in levels:
        n = requests_for(clients, quick)
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = list(pool.map(call, range(n)))
        results.append(LoadResult(clients, n, time.perf_counter() - start, latencies))
        log.info("reference, %d clients: %.1f req/s", clients, results[-1].throughput)
    return results, answers


# ---- the Serve app -----------------------------------------------------------------------------
async def _load(url: str, clients: int, n: int, body: Callable[[int], dict],
                answers: dict[int, str] | None, count: int) -> LoadResult:
    latencies, vision, errors, identical, steps = [], [], 0, 0, []
    differ: list[tuple[int, str, str]] = []
    statuses: dict[str, int] = {}
    next_index = iter(range(n))
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def worker() -> None:
            nonlocal errors, identical
            for i in next_index:
                start = time.perf_counter()
                resp = await http.post("/v1/chat/completions", json=body(i))
                latencies.append((time.perf_counter() - start) * 1e3)
                statuses[str(resp.status_code)] = statuses.get(str(resp.status_code), 0) + 1
                if resp.status_code != 200:
                    errors += 1
                    continue
                data = resp.json()
                info = MoVAInfo.from_response(data)
                vision.append(info.vision_ms)
                steps.append({**info.vision_steps_ms, **(info.timings_ms or {})})
                if answers is not None:
                    text, expected = data["choices"][0]["message"]["content"], answers[i % count]
                    identical += text == expected
                    if text != expected and len(differ) < MAX_DIFFER:
                        differ.append((i % count, text, expected))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return LoadResult(clients, n, time.perf_counter() - start, latencies, errors, identical,
                      vision, steps, statuses, differ=differ)


def _body(inputs: list[tuple[str, str]], max_tokens: int,
          experts: Sequence[str] | None = None) -> Callable[[int], dict]:
    def make(i: int) -> dict:
        uri, question = inputs[i % len(inputs)]
        body = {"model": "mova", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": uri}}]}]}
        if experts is not None:
            body["mova"] = {"experts": list(experts)}
        return body
    return make


def _memory() -> dict[str, float]:
    status = serve.status().applications["mova"].deployments
    out = {}
    for name in status:
        info = serve.get_deployment_handle(name, app_name="mova").info.remote().result()
        out[name] = info["rss_bytes"] / 2**20
    return out


def run_served(checkpoint: str, inputs: list[tuple[str, str]], levels: Sequence[int],
               answers: dict[int, str], result: ServeBenchResult, *, max_new_tokens: int,
               quick: bool, port: int, overrides: Sequence[str] = (),
               expert_sets: bool = True, engine: str = "torch") -> None:
    """The Serve app under each load level (appended to ``result.served``, tagged with
    ``engine``, a label of the LLM engine that ``overrides`` choose), then the expert sets."""
    recipe = load_recipe(ServeRecipe, None, [  # the torch loop unless ``overrides`` choose
        f"checkpoint={checkpoint}", f"port={port}", "llm.engine=torch", "limits.max_inflight=256",
        f"limits.max_tokens={max(64, max_new_tokens)}", "experts.default.num_replicas=1",
        "experts.default.autoscaling=null", *overrides])
    init_ray("local", num_cpus=os.cpu_count() or 2,
             temp_dir=tempfile.mkdtemp(prefix="mova-bench-serve-", dir="/tmp"))
    try:
        url = start(recipe)
        warm = _body(inputs, 4, experts=None)
        asyncio.run(_load(url, 4, 8, warm, None, len(inputs)))
        asyncio.run(_load(url, 2, 4, _body(inputs, 4, experts=_all_experts(checkpoint)),
                          None, len(inputs)))
        for clients in levels:
            n = requests_for(clients, quick)
            res = asyncio.run(_load(url, clients, n, _body(inputs, max_new_tokens), answers,
                                    len(inputs)))
            res.engine = engine
            result.served.append(res)
            log.info("serve (%s), %d clients: %.1f req/s (%d errors)", engine, clients,
                     res.throughput, res.errors)
        sets = EXPERT_SETS[::3] if quick else EXPERT_SETS
        for label, names in sets if expert_sets else ():
            experts = _all_experts(checkpoint) if names is None else list(names)
            body = _body(inputs, 8, experts=experts)
            result.experts[label] = [
                asyncio.run(_load(url, c, requests_for(c, quick), body, None, len(inputs)))
                for c in (1, 8)]
        result.memory_mib = _memory()
        result.replica_batches = _batches()
        result.real.setdefault("engines", {})[engine] = {
            "memory_mib": result.memory_mib, "llm": result.replica_batches.get("LLM", {})}
    finally:
        serve.shutdown()
        ray.shutdown()


def _batches() -> dict[str, Any]:
    out = {}
    for name in serve.status().applications["mova"].deployments:
        info = serve.get_deployment_handle(name, app_name="mova").info.remote().result()
        if "batches" in info:
            out[name] = info["batches"]
    return out


def _all_experts(checkpoint: str) -> list[str]:
    return load_config(checkpoint).expert_names


def bench_serve(*, levels: Sequence[int] = CONCURRENCY, max_new_tokens: int = 32,
                seed: int = 0, quick: bool = False, port: int | None = None) -> ServeBenchResult:
    """Run the reference loop, then the Serve app, on the same tiny model and inputs (both
    decode routing replies under the routing constraint, the server's default)."""
    result = ServeBenchResult(machine=machine_info(torch.device("cpu")),
                              settings={"levels": list(levels), "max_new_tokens": max_new_tokens,
                                        "seed": seed, "quick": quick})
    model = build_tiny_mova(seed=seed)
    inputs = bench_inputs(16, seed)
    with tempfile.TemporaryDirectory(prefix="mova-bench-serve-") as tmp:
        checkpoint = str(model.save_pretrained(f"{tmp}/ckpt"))
        result.real["routing"] = routing_cost(model, inputs[:8])
        use_constrained_routing(model)
        with torch.inference_mode():
            result.reference, answers = run_reference(model, inputs, levels,
                                                      max_new_tokens=max_new_tokens,
                                                      quick=quick)
        result.reference_peak_rss_mib = peak_memory_mib(torch.device("cpu"))
        del model

        run_served(checkpoint, inputs, levels, answers, result, max_new_tokens=max_new_tokens,
                   quick=quick, port=port or free_local_port())
    return result


def routing_cost(model, inputs: list[tuple[str, str]]) -> dict[str, Any]:
    """Routing decode per request (batch 1), free vs constrained: median ms and steps."""
    out: dict[str, Any] = {}
    pil = model.prepare_images([uri for uri, _ in inputs])
    for label, params in (("free", model.routing_params()),
                          ("constrained", constrained_routing_params(model))):
        times, steps, parsed = [], [], 0
        for image, (_, question) in zip(pil, inputs, strict=True):
            with torch.inference_mode():
                base = model.encode_base(model.processor.base([image]))
                text = model.encode_questions([[question]])
                tokens = model.routing_tokens(base, text)
                rows = model.routing_prompt_ids([question], tokens.shape[1])
                start = time.perf_counter()
                reply, _, n = model.decode(rows, tokens, params)[0]
                times.append((time.perf_counter() - start) * 1e3)
            steps.append(n)
            parsed += bool(model.parse_routes([reply]).experts[0]) or reply.lower().strip(
                ". ") == "none"
        out[label] = {"median_ms": statistics.median(times), "mean_steps": statistics.mean(steps),
                      "well_formed": parsed, "requests": len(inputs)}
    return out

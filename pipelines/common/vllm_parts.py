"""vLLM's side of an LLM pass, shared by the engines that run one (the Serve LLM deployment's
:mod:`pipelines.serve.vllm_engine`, `mova eval`'s :mod:`pipelines.evaluate.vllm_decode`):
mixed prompts (text as token ids, image tokens as embedding rows), our decode settings as
vLLM's, the engine's arguments from the recipe's ``llm.vllm`` section, and answer text built
from token ids exactly as the torch loop builds it.

Imports vLLM (optional, ~9 s to import): only modules that run vLLM import this one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from mova.decoding import DecodeParams
from mova.text_stream import TextAssembler
from pipelines.common.llm_engine import VLLMRecipe

log = logging.getLogger(__name__)


def mixed_prompt(ids: Sequence[int], image_tokens: torch.Tensor | None, image_token_id: int,
                 dtype: torch.dtype) -> dict[str, Any]:
    """vLLM's mixed prompt: rows of the image run (``image_token_id`` in ``ids``) come from
    ``image_tokens`` ((L, D) or (1, L, D)) as ``prompt_embeds``, the others are token ids
    (their embedding rows are zeros and unused)."""
    ids = [int(t) for t in ids]
    is_text = [t != image_token_id for t in ids]
    if all(is_text):
        return {"prompt_token_ids": ids}
    if image_tokens is None:
        raise ValueError("the prompt holds image tokens but no image features were given")
    rows = image_tokens.reshape(-1, image_tokens.shape[-1])
    if rows.shape[0] != len(ids) - sum(is_text):
        raise ValueError(f"the prompt has {len(ids) - sum(is_text)} image positions but "
                         f"{rows.shape[0]} image tokens")
    embeds = torch.zeros(len(ids), rows.shape[-1], dtype=dtype)
    embeds[~torch.tensor(is_text)] = rows.detach().to("cpu", dtype)
    return {"prompt_embeds": embeds, "prompt_token_ids": ids, "prompt_is_token_ids": is_text}


def sampling_params(params: DecodeParams, eos_ids: Sequence[int],
                    output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> SamplingParams:
    """vLLM's settings for one row (by default its tokens streamed as deltas)."""
    structured = None
    if params.constraint is not None:
        regex = getattr(params.constraint, "regex", None)
        if not isinstance(regex, str):
            raise ValueError(f"the vLLM engine needs a regex for constraint "
                             f"{type(params.constraint).__name__}")
        structured = StructuredOutputsParams(regex=regex)
    return SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature if params.do_sample else 0.0,
        top_p=params.top_p if params.do_sample else 1.0,
        seed=params.seed, stop=list(params.stop) or None, stop_token_ids=list(eos_ids),
        structured_outputs=structured, output_kind=output_kind)


def cpu_list(bind: str, threads: int, cpus: Sequence[int], pid: int) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for the recipe's ``cpu_bind``. ``all``: every CPU
    in ``cpus`` (those this process may use; vLLM's own "auto" leaves one out). ``auto``:
    ``threads`` of them (what the replica or actor was given, as for its torch threads), taken
    from a place that turns with ``pid`` so that engines on one node spread over its CPUs.
    vLLM's threads spin between steps: bound to more CPUs than were given, they starve the
    node's other replicas. Anything else is vLLM's own syntax, passed as it is."""
    if bind not in ("all", "auto"):
        return bind
    cpus = sorted(cpus)
    if bind == "auto" and threads < len(cpus):
        start = pid % len(cpus)
        cpus = sorted((cpus + cpus)[start:start + max(1, threads)])
    return ",".join(str(c) for c in cpus)


def _llm_config(folder: str | Path) -> dict[str, Any]:
    """An LLM folder's ``config.json`` (empty when it has none: vLLM then says what is
    missing)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def recorded_dtype(folder: str | Path) -> str:
    """The dtype an LLM folder's ``config.json`` records (``dtype``, or the older
    ``torch_dtype``); ``auto`` when it records none. vLLM's own ``auto`` would run a float32
    checkpoint in bfloat16; ours keeps what training exported."""
    config = _llm_config(folder)
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def model_len(folder: str | Path, cap: int) -> int:
    """The recipe's ``max_model_len``, a cap: no longer than the positions the model has
    (vLLM refuses a longer one; a small model's 512 must not need a recipe of its own)."""
    positions = _llm_config(folder).get("max_position_embeddings")
    if isinstance(positions, int) and 0 < positions < cap:
        log.info("max_model_len %d capped to the model's %d positions", cap, positions)
        return positions
    return cap


def engine_kwargs(folder: str, settings: VLLMRecipe, max_rows: int,
                  **extra: Any) -> dict[str, Any]:
    """vLLM's engine arguments for ``AsyncEngineArgs`` or ``LLM`` (``extra``: more of vLLM's,
    or replacing these); CPU-only settings go through vLLM's environment variables."""
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(
            settings.cpu_bind, torch.get_num_threads(), sorted(os.sched_getaffinity(0)),
            os.getpid())
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
    return {
        "model": folder, "tokenizer": folder,
        "dtype": recorded_dtype(folder) if settings.dtype == "auto" else settings.dtype,
        "max_model_len": model_len(folder, settings.max_model_len), "max_num_seqs": max_rows,
        "enable_prompt_embeds": True, "enable_prefix_caching": settings.prefix_caching,
        "enforce_eager": settings.enforce_eager, "distributed_executor_backend": "uni",
        "block_size": settings.block_size or None, "disable_log_stats": False,
        "kv_cache_memory_bytes": settings.kv_cache_gib * 2**30 if gpu else None, **extra}


def answer_text(tokenizer: Any, token_ids: Sequence[int], stop: Sequence[str]) -> str:
    """The final text of generated ``token_ids``: special tokens skipped, cut at the first stop
    string, stripped (:class:`mova.text_stream.TextAssembler`, as the torch loop)."""
    text = TextAssembler(tokenizer, stop)
    text.tokens = [int(t) for t in token_ids]
    return text.finish()[0]

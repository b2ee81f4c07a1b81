"""`mova eval`'s LLM passes on vLLM (``llm.engine: vllm`` in the eval recipe).

The eval actor keeps the vision side of the model (encoders, experts, adapter; no LLM weights)
and hands both LLM passes to one vLLM engine that reads the checkpoint's ``llm/`` folder
itself: :class:`VLLMDecode` is the model's ``decode_backend``
(:attr:`mova.generation.GenerationMixin.decode_backend`). A pass's rows go to vLLM at once as
mixed prompts (text as token ids, the image tokens as embedding rows), so vLLM batches them
continuously and its prefix cache serves the shared routing instructions; answers are built
from token ids as the torch loop builds them, so fp32 greedy answers equal the loop's.

Imports vLLM (optional, ~9 s): only :mod:`pipelines.evaluate.workers` imports this module,
and only when the recipe picks vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from vllm import LLM
from vllm.sampling_params import RequestOutputKind

from mova.decoding import DecodeParams
from pipelines.common.llm_engine import VLLMRecipe
from pipelines.common.vllm_parts import answer_text, engine_kwargs, mixed_prompt, sampling_params

log = logging.getLogger(__name__)


class VLLMDecode:
    """Decodes a batch of rows with one vLLM engine (offline ``LLM.generate``)."""

    def __init__(self, folder: str, tokenizer: Any, eos_ids: Sequence[int],
                 image_token_id: int, settings: VLLMRecipe, max_rows: int) -> None:
        start = time.perf_counter()
        self.llm = LLM(**engine_kwargs(folder, settings, max_rows, disable_log_stats=True))
        self.dtype = self.llm.model_config.dtype
        self.tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self.image_token_id = image_token_id
        self.started_s = time.perf_counter() - start
        log.info("vLLM engine for eval started in %.1f s (%s)", self.started_s, folder)

    def __call__(self, prompt_ids: Sequence[Sequence[int]],
                 image_tokens: Tensor | Sequence[Tensor] | None,
                 params: Sequence[DecodeParams]) -> list[tuple[str, int, int]]:
        prompts = [mixed_prompt(ids, None if image_tokens is None else image_tokens[i],
                                self.image_token_id, self.dtype)
                   for i, ids in enumerate(prompt_ids)]
        settings = [sampling_params(p, self.eos_ids, RequestOutputKind.FINAL_ONLY)
                    for p in params]
        outputs = self.llm.generate(prompts, settings, use_tqdm=False)
        out = []
        for ids, p, result in zip(prompt_ids, params, outputs, strict=True):
            tokens = list(result.outputs[0].token_ids)
            out.append((answer_text(self.tokenizer, tokens, p.stop), len(ids), len(tokens)))
        return out

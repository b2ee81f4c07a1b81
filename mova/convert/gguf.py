"""A llama-architecture GGUF file -> a plain float32 ``LlamaForCausalLM`` (dequantised)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mova.convert import ConversionError

log = logging.getLogger(__name__)

DTYPE = "float32"


def gguf_to_llama(path: Path) -> Any:
    """A float32 ``LlamaForCausalLM`` holding the dequantised weights of a llama GGUF file.

    transformers' own GGUF loader reads and dequantises the file; its model keeps a
    ``quantization_config`` that ``save_pretrained`` refuses, so the weights move into a plain
    model built from the same config without it.
    """
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise ConversionError(f"{path}: architecture {loaded.config.model_type!r}, "
                              "expected 'llama'")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = DTYPE
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"{path}: GGUF tensors do not fit LlamaForCausalLM "
                              f"(missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    log.info("llm: %s loaded and dequantised in %.1f s", path.name, time.perf_counter() - start)
    return model.eval()


def greedy_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy reply to one user turn, with the tokenizer's own chat template."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

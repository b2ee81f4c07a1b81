"""Build the parts of a MoVA model from its config, without importing the model itself.

Random-init tiny parts where nothing is pretrained, or real checkpoints by path or hub id.
:mod:`mova.factory` and :mod:`mova.checkpoint` assemble these parts into a model.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from mova.adapter import MoVAdapter
from mova.config import MoVAConfig
from mova.experts.encoders import build_base_encoder, build_expert
from mova.experts.registry import get_expert_spec, resolve_expert
from mova.routing import LETTERS
from mova.tokenizers import IMAGE_TOKEN, build_tiny_bert_tokenizer, build_tiny_llm_tokenizer

log = logging.getLogger(__name__)

def routing_corpus(config: MoVAConfig) -> list[str]:
    """Texts the tiny tokenizers are trained on besides their own corpus: each expert's
    routing descriptions and the routing replies of this pool (its letters, alone and in
    lists)."""
    texts = []
    letters = LETTERS[:len(config.experts)]
    for i in range(len(letters)):
        texts += [letters[i], ", ".join(letters[i:i + 3]), f"Option {letters[i]} is correct."]
    for e in config.experts:
        texts.extend(get_expert_spec(e.name).descriptions)
    return texts


def routing_descriptions(config: MoVAConfig) -> list[str]:
    """One routing description per pool expert, in pool (letter) order, for the configured
    ``routing.prompt``: the released one-liners, or our descriptions at ``description_index``."""
    specs = [get_expert_spec(e.name) for e in config.experts]
    if config.routing.prompt == "released":
        missing = [s.name for s in specs if not s.reference_description]
        if missing:
            raise ValueError(f"experts {missing} have no released routing description")
        return [s.reference_description for s in specs]  # type: ignore[misc]
    idx = config.routing.description_index
    return [s.descriptions[idx % len(s.descriptions)] for s in specs]


def ensure_image_token(tokenizer: Any, llm: nn.Module | None = None) -> Any:
    """Add the image placeholder token (and a pad token) if the tokenizer lacks them."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}) \
        if IMAGE_TOKEN not in tokenizer.get_vocab() else 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if llm is not None and (added or len(tokenizer) > llm.get_input_embeddings().num_embeddings):
        llm.resize_token_embeddings(len(tokenizer))
    return tokenizer


def build_tokenizers(config: MoVAConfig) -> tuple[Any, Any]:
    """LLM and text-encoder tokenizers: loaded with the pretrained weights, or built locally."""
    if config.llm.pretrained:
        tokenizer = AutoTokenizer.from_pretrained(config.llm.pretrained)
    else:
        tokenizer = build_tiny_llm_tokenizer(routing_corpus(config))
    if config.text_encoder.pretrained:
        text_tokenizer = AutoTokenizer.from_pretrained(config.text_encoder.pretrained)
    else:
        text_tokenizer = build_tiny_bert_tokenizer(routing_corpus(config))
    return ensure_image_token(tokenizer), text_tokenizer


def build_llm(config: MoVAConfig, tokenizer: Any) -> nn.Module:
    c = config.llm
    if c.pretrained:
        llm = AutoModelForCausalLM.from_pretrained(c.pretrained,
                                                   attn_implementation=c.attn_implementation)
    else:
        llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attn_implementation=c.attn_implementation,
        ))
    ensure_image_token(tokenizer, llm)
    if llm.config.hidden_size != c.hidden_size:
        raise ValueError(f"LLM {c.pretrained!r} has width {llm.config.hidden_size}; the config "
                         f"says llm.hidden_size={c.hidden_size}")
    return llm


def build_text_encoder(config: MoVAConfig, text_tokenizer: Any) -> nn.Module:
    c = config.text_encoder
    if c.pretrained:
        model = BertModel.from_pretrained(c.pretrained, add_pooling_layer=False)
    else:
        model = BertModel(BertConfig(
            vocab_size=len(text_tokenizer), hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size, max_position_embeddings=c.max_length,
        ), add_pooling_layer=False)
    if model.config.hidden_size != c.hidden_size:
        raise ValueError(f"text encoder {c.pretrained!r} has width {model.config.hidden_size}; "
                         f"the config says text_encoder.hidden_size={c.hidden_size}")
    return model


def build_adapter(config: MoVAConfig) -> MoVAdapter:
    channels = {e.name: resolve_expert(e).channels for e in config.experts}
    return MoVAdapter(config.adapter, hidden_size=config.base.hidden_size,
                      grid_size=config.base.grid_size, expert_channels=channels,
                      text_hidden_size=config.text_encoder.hidden_size,
                      llm_hidden_size=config.llm.hidden_size)


def build_parts(config: MoVAConfig) -> dict[str, Any]:
    """Every part of a model for ``config``, as keyword arguments of ``MoVAModel``."""
    tokenizer, text_tokenizer = build_tokenizers(config)
    return {
        "llm": build_llm(config, tokenizer),
        "tokenizer": tokenizer,
        "text_encoder": build_text_encoder(config, text_tokenizer),
        "text_tokenizer": text_tokenizer,
        "base_encoder": build_base_encoder(config.base),
        "experts": {e.name: build_expert(resolve_expert(e)) for e in config.experts},
        "adapter": build_adapter(config),
    }

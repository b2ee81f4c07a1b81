"""Two-stage MoVA inference: batched routing decode, then the answer decode.

Works on batches where every sample has its own routing (the released code asserts batch 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mova.conversation import tokenize_conversation, user_questions, validate_turns
from mova.routing import build_routing_prompt, parse_routing
from mova.tokenizers import IMAGE_TOKEN

if TYPE_CHECKING:
    from mova.model import GenerationResult, MoVAModel, RoutingResult

log = logging.getLogger(__name__)


def _eos_ids(model: MoVAModel) -> list[int]:
    tok = model.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    suffix = model.template.assistant_suffix.strip()
    if suffix:
        suffix_ids = tok.encode(suffix, add_special_tokens=False)
        if len(suffix_ids) == 1:
            ids.add(suffix_ids[0])
    return sorted(ids)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def _cut_stop(text: str, stop: Sequence[str] | None) -> str:
    for s in stop or ():
        pos = text.find(s)
        if s and pos >= 0:
            text = text[:pos]
    return text


@torch.no_grad()
def decode(model: MoVAModel, prompt_ids: Sequence[Sequence[int]], image_tokens: Tensor | None,
           *, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
           ) -> list[tuple[str, int, int]]:
    """Decode a left-padded batch; returns (text, prompt tokens, generated tokens) per row."""
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = _left_pad(prompt_ids, pad_id)
    limit = model.config.llm.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} "
                         f"exceeds the LLM's context of {limit} tokens")
    embeds = model.embed(ids, image_tokens)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "eos_token_id": _eos_ids(model), "pad_token_id": pad_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask.to(model.device),
                                 **kwargs)
    eos = set(kwargs["eos_token_id"])
    results = []
    for i, row in enumerate(out.tolist()):
        tokens = []
        for t in row:
            if t in eos:
                break
            tokens.append(t)
        text = _cut_stop(tok.decode(tokens, skip_special_tokens=True), stop).strip()
        results.append((text, int(mask[i].sum()), len(tokens)))
    return results


def route(model: MoVAModel, routing_tokens: Tensor, questions: Sequence[str]) -> RoutingResult:
    """Ask the LLM which experts suit each (image, question); parse strictly."""
    from mova.model import RoutingResult

    cfg = model.config.routing
    descriptions = model.routing_descriptions()
    rows = []
    for q in questions:
        prompt = build_routing_prompt(q, descriptions, image_token=IMAGE_TOKEN,
                                      max_experts=cfg.max_experts)
        enc = tokenize_conversation([{"from": "human", "value": prompt}], model.tokenizer,
                                    model.template, routing_tokens.shape[1],
                                    for_generation=True)
        rows.append(enc["input_ids"])
    replies = [t for t, _, _ in decode(model, rows, routing_tokens,
                                       max_new_tokens=cfg.max_new_tokens)]
    n = len(model.expert_names)
    picked = [parse_routing(r, n, cfg.max_experts) for r in replies]
    mask = torch.zeros(len(questions), n, dtype=torch.bool)
    for i, idx in enumerate(picked):
        mask[i, idx] = True
    experts = [[model.expert_names[j] for j in idx] for idx in picked]
    return RoutingResult(mask=mask, replies=replies, experts=experts)


def answer(model: MoVAModel, image_tokens: Tensor, conversations: Sequence[Sequence[dict]],
           *, max_new_tokens: int | None = None, do_sample: bool | None = None,
           temperature: float | None = None, top_p: float | None = None,
           seed: int | None = None, stop: Sequence[str] | None = None,
           ) -> list[tuple[str, int, int]]:
    """The answer decode from fused image tokens and conversations ending in a human turn."""
    gen = model.config.generation
    rows = [tokenize_conversation(turns, model.tokenizer, model.template,
                                  image_tokens.shape[1], for_generation=True)["input_ids"]
            for turns in conversations]
    return decode(model, rows, image_tokens,
                  max_new_tokens=max_new_tokens or gen.max_new_tokens,
                  do_sample=gen.do_sample if do_sample is None else do_sample,
                  temperature=gen.temperature if temperature is None else temperature,
                  top_p=gen.top_p if top_p is None else top_p, seed=seed, stop=stop)


def _as_turns(item: str | Sequence[dict]) -> list[dict]:
    if isinstance(item, str):
        return [{"from": "human", "value": item}]
    return validate_turns(list(item), for_generation=True)


def generate(model: MoVAModel, images: Sequence, questions: Sequence[str | Sequence[dict]],
             *, experts: Sequence[Sequence[str]] | Sequence[str] | None = None,
             **decode_kwargs: Any) -> list[GenerationResult]:
    """Route then answer a batch. ``experts`` forces the routing: one list per sample, or a
    single list of names for all samples."""
    from mova.model import GenerationResult

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if not images:
        return []
    conversations = [_as_turns(q) for q in questions]
    pil = model.prepare_images(images)
    model.eval()
    with torch.no_grad():
        base = model.encode_base(model.processor.base(pil))
        text = model.encode_questions([user_questions(c) for c in conversations])
        if experts is None:
            routing = model.route(model.routing_tokens(base, text),
                                  [user_questions(c)[-1] for c in conversations])
            mask, replies, names = routing.mask, routing.replies, routing.experts
        else:
            if experts and all(isinstance(e, str) for e in experts):
                experts = [list(experts)] * len(images)  # type: ignore[list-item]
            if len(experts) != len(images):
                raise ValueError(f"experts has {len(experts)} entries for {len(images)} images")
            mask = model.mask_from_names(experts)  # type: ignore[arg-type]
            replies = [None] * len(images)
            names = [[n for n in model.expert_names if n in set(e)] for e in experts]
        routed = [n for j, n in enumerate(model.expert_names) if bool(mask[:, j].any())]
        inputs = model.processor.experts_inputs(routed, pil)
        feats = model.routed_expert_features(inputs, mask)
        fused = model.fuse(base, text, feats, mask)
        decoded = model.answer(fused.image_tokens, conversations, **decode_kwargs)
    gates = fused.gate_weights
    return [
        GenerationResult(
            answer=text_out, experts=names[i], routing_reply=replies[i],
            gate_weights=gates[i].tolist() if gates is not None else [],
            num_prompt_tokens=n_prompt, num_generated_tokens=n_new,
        )
        for i, (text_out, n_prompt, n_new) in enumerate(decoded)
    ]

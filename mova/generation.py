"""Two-stage MoVA inference as a mixin of the model: batched routing decode, then the answer.

Works on batches where every sample has its own routing (the released code asserts batch 1).
All decoding goes through :class:`mova.decoding.BatchDecoder` (or the model's
``decode_backend``, an engine outside the library); this module only builds the prompts and
reads the replies. It never imports the model (the model inherits from it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mova.conversation import tokenize_conversation, user_questions, validate_turns
from mova.decoding import BatchDecoder, DecodeParams, StepEvent, left_pad
from mova.outputs import GenerationResult, RoutingResult
from mova.routing import parse_routing, render_routing_prompt
from mova.tokenizers import IMAGE_TOKEN

log = logging.getLogger(__name__)


def _as_turns(item: str | Sequence[dict]) -> list[dict]:
    if isinstance(item, str):
        return [{"from": "human", "value": item}]
    return validate_turns(list(item), for_generation=True)


DecodeBackend = Callable[[Sequence[Sequence[int]], Tensor | Sequence[Tensor] | None,
                          Sequence[DecodeParams]], list[tuple[str, int, int]]]


class GenerationMixin:
    """Routing, answering and end-to-end generation for :class:`mova.modeling.MoVAModel`."""

    #: Decodes both passes instead of the torch loop when set (an engine outside the library,
    #: e.g. `mova eval` on vLLM): ``(prompt_ids, image_tokens, params per row)`` -> ``(text,
    #: prompt tokens, generated tokens)`` per row, as :meth:`decode` returns them.
    decode_backend: DecodeBackend | None = None

    # ---- decoding ------------------------------------------------------------------------
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: the tokenizer's, plus the template's one-token turn suffix."""
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        suffix = self.template.assistant_suffix.strip()
        if suffix:
            suffix_ids = tok.encode(suffix, add_special_tokens=False)
            if len(suffix_ids) == 1:
                ids.add(suffix_ids[0])
        return sorted(ids)

    def new_decoder(self) -> BatchDecoder:
        """An empty decode batch bound to this model's LLM."""
        return BatchDecoder(self.llm, self.tokenizer, self.eos_ids(),
                            max_context=self.config.llm.max_position_embeddings)

    def prompt_embeddings(self, prompt_ids: Sequence[Sequence[int]],
                          image_tokens: Tensor | Sequence[Tensor] | None
                          ) -> tuple[Tensor, Tensor]:
        """Left-padded prompt embeddings with the image tokens in place, and their mask."""
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, mask = left_pad(prompt_ids, pad_id)
        with torch.no_grad():
            return self.embed(ids, image_tokens), mask

    def decode_stream(self, prompt_ids: Sequence[Sequence[int]],
                      image_tokens: Tensor | Sequence[Tensor] | None,
                      params: Sequence[DecodeParams]) -> Iterator[list[StepEvent]]:
        """Decode a batch, yielding each step's events (``event.row`` is the row index)."""
        if len(prompt_ids) != len(params) or not params:
            raise ValueError(f"{len(prompt_ids)} prompts but {len(params)} decode params")
        decoder = self.new_decoder()
        embeds, mask = self.prompt_embeddings(prompt_ids, image_tokens)
        decoder.add(embeds, mask, params, keys=list(range(len(params))))
        while len(decoder):
            events = decoder.step()
            if events:
                yield events

    def decode(self, prompt_ids: Sequence[Sequence[int]],
               image_tokens: Tensor | Sequence[Tensor] | None,
               params: DecodeParams | Sequence[DecodeParams]) -> list[tuple[str, int, int]]:
        """Decode a batch to the end: (text, prompt tokens, generated tokens) per row."""
        if isinstance(params, DecodeParams):
            params = [params] * len(prompt_ids)
        if self.decode_backend is not None:
            return self.decode_backend(prompt_ids, image_tokens, params)
        finals: dict[Hashable, StepEvent] = {}
        for events in self.decode_stream(prompt_ids, image_tokens, params):
            finals.update((e.row, e) for e in events if e.done)
        return [(finals[i].text, finals[i].prompt_tokens, finals[i].completion_tokens)
                for i in range(len(prompt_ids))]

    # ---- the two stages ------------------------------------------------------------------
    def routing_prompt_ids(self, questions: Sequence[str], num_tokens: int) -> list[list[int]]:
        """Token ids of the routing prompt for each question (image run of ``num_tokens``)."""
        cfg = self.config.routing
        descriptions = self.routing_descriptions()
        rows = []
        for q in questions:
            prompt = render_routing_prompt(cfg.prompt, q, descriptions, image_token=IMAGE_TOKEN,
                                           max_experts=cfg.max_experts)
            enc = tokenize_conversation([{"from": "human", "value": prompt}], self.tokenizer,
                                        self.template, num_tokens, for_generation=True)
            rows.append(enc["input_ids"])
        return rows

    def routing_params(self) -> DecodeParams:
        """Greedy decoding of the routing reply, within the routing token budget."""
        return DecodeParams(max_new_tokens=self.config.routing.max_new_tokens)

    def parse_routes(self, replies: Sequence[str]) -> RoutingResult:
        """Routing replies -> mask and expert names (strict parser; a bad reply is no expert)."""
        cfg = self.config.routing
        n = len(self.expert_names)
        picked = [parse_routing(r, n, cfg.max_experts) for r in replies]
        mask = torch.zeros(len(replies), n, dtype=torch.bool)
        for i, idx in enumerate(picked):
            mask[i, idx] = True
        experts = [[self.expert_names[j] for j in idx] for idx in picked]
        return RoutingResult(mask=mask, replies=list(replies), experts=experts)

    def route(self, routing_tokens: Tensor, questions: Sequence[str]) -> RoutingResult:
        """Ask the LLM which experts suit each (image, question); parse strictly."""
        rows = self.routing_prompt_ids(questions, routing_tokens.shape[1])
        replies = [t for t, _, _ in self.decode(rows, routing_tokens, self.routing_params())]
        return self.parse_routes(replies)

    def answer_prompt_ids(self, conversations: Sequence[Sequence[dict]],
                          num_tokens: int) -> list[list[int]]:
        return [tokenize_conversation(turns, self.tokenizer, self.template, num_tokens,
                                      for_generation=True)["input_ids"]
                for turns in conversations]

    def answer_params(self, *, max_new_tokens: int | None = None, do_sample: bool | None = None,
                      temperature: float | None = None, top_p: float | None = None,
                      seed: int | None = None, stop: Sequence[str] | None = None
                      ) -> DecodeParams:
        """Decode settings of an answer: the given values over the config's defaults."""
        gen = self.config.generation
        return DecodeParams(
            max_new_tokens=max_new_tokens or gen.max_new_tokens,
            do_sample=gen.do_sample if do_sample is None else do_sample,
            temperature=gen.temperature if temperature is None else temperature,
            top_p=gen.top_p if top_p is None else top_p, seed=seed, stop=tuple(stop or ()))

    def answer(self, image_tokens: Tensor, conversations: Sequence[Sequence[dict]],
               **decode_kwargs: Any) -> list[tuple[str, int, int]]:
        """The answer decode from fused image tokens and conversations ending in a human turn."""
        rows = self.answer_prompt_ids(conversations, image_tokens.shape[1])
        return self.decode(rows, image_tokens, self.answer_params(**decode_kwargs))

    def generate(self, images: Sequence, questions: Sequence[str | Sequence[dict]], *,
                 experts: Sequence[Sequence[str]] | Sequence[str] | None = None,
                 **decode_kwargs: Any) -> list[GenerationResult]:
        """Route then answer a batch. ``experts`` forces the routing: one list per sample, or a
        single list of names for all samples."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        conversations = [_as_turns(q) for q in questions]
        pil = self.prepare_images(images)
        self.eval()
        with torch.no_grad():
            base = self.encode_base(self.processor.base(pil))
            text = self.encode_questions([user_questions(c) for c in conversations])
            if experts is None:
                routing = self.route(self.routing_tokens(base, text),
                                     [user_questions(c)[-1] for c in conversations])
            else:
                routing = self._forced_routing(experts, len(images))
            mask = routing.mask
            routed = [n for j, n in enumerate(self.expert_names) if bool(mask[:, j].any())]
            inputs = self.processor.experts_inputs(routed, pil)
            feats = self.routed_expert_features(inputs, mask)
            fused = self.fuse(base, text, feats, mask)
            decoded = self.answer(fused.image_tokens, conversations, **decode_kwargs)
        gates = fused.gate_weights
        return [
            GenerationResult(
                answer=text_out, experts=routing.experts[i], routing_reply=routing.replies[i],
                gate_weights=gates[i].tolist() if gates is not None else [],
                num_prompt_tokens=n_prompt, num_generated_tokens=n_new,
            )
            for i, (text_out, n_prompt, n_new) in enumerate(decoded)
        ]

    def _forced_routing(self, experts: Sequence[Sequence[str]] | Sequence[str],
                        batch: int) -> RoutingResult:
        if experts and all(isinstance(e, str) for e in experts):
            experts = [list(experts)] * batch  # type: ignore[list-item]
        if len(experts) != batch:
            raise ValueError(f"experts has {len(experts)} entries for {batch} images")
        mask = self.mask_from_names(experts)  # type: ignore[arg-type]
        names = [[n for n in self.expert_names if n in set(e)] for e in experts]
        return RoutingResult(mask=mask, replies=[None] * batch, experts=names)  # type: ignore

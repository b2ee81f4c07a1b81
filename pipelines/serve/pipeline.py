"""One request through the deployments: checks first, then the MoVA flow.

preprocess + base + text (Adapter) -> routing decode (LLM) -> the routed experts, in parallel
(one deployment each) -> MoV-Adapter fusion (Adapter, reusing the base features) -> the answer
decode, streamed (LLM). Everything that can be checked without a model (the image, the prompt
length, the parameters, forced expert names) is checked before the first model call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mova.checkpoint import load_config, read_components
from mova.config import MoVAConfig
from mova.conversation import get_template, tokenize_conversation, validate_turns
from mova.decoding import DecodeParams
from mova.experts.registry import resolve_expert
from mova.routing import build_routing_prompt
from mova.tokenizers import IMAGE_TOKEN
from pipelines.serve.errors import RequestError, bad_request
from pipelines.serve.openai_types import ChatRequest, Conversation, MoVAInfo, stop_list
from pipelines.serve.recipe import ServeRecipe


@dataclass
class Prepared:
    """A checked request, ready for the model."""

    image: Any  # [ObjectRef] of the decoded PIL image
    questions: list[str]
    prompt_ids: list[int]
    params: DecodeParams
    forced: list[str] | None


@dataclass
class Vision:
    """What the vision side decided and produced for one request."""

    experts: list[str]
    forced: bool
    routing_reply: str | None
    gate_weights: list[list[float]]
    image_tokens: Any  # [ObjectRef] of (1, tokens, D)
    seconds: float
    steps_ms: dict[str, float] = field(default_factory=dict)

    def extension(self, pool: list[str]) -> MoVAInfo:
        """The response's ``mova`` field."""
        return MoVAInfo(experts=self.experts, forced=self.forced,
                        routing_reply=self.routing_reply, pool=pool,
                        gate_weights=self.gate_weights, vision_ms=round(self.seconds * 1e3, 2),
                        vision_steps_ms=self.steps_ms)


class PromptChecker:
    """The LLM-side facts the ingress needs to check a request: tokenizer, template, context
    length, pool and generation defaults (loaded from the checkpoint, no weights)."""

    def __init__(self, checkpoint: str, recipe: ServeRecipe) -> None:
        from pathlib import Path

        from transformers import AutoTokenizer

        from mova.builders import ensure_image_token

        self.config: MoVAConfig = load_config(checkpoint)
        llm_dir = Path(checkpoint) / read_components(checkpoint)["llm"]
        self.tokenizer = ensure_image_token(AutoTokenizer.from_pretrained(llm_dir))
        self.template = get_template(self.config.llm.chat_template)
        self.pool = self.config.expert_names
        idx = self.config.routing.description_index
        specs = [resolve_expert(e).spec for e in self.config.experts]
        self.descriptions = [s.descriptions[idx % len(s.descriptions)] for s in specs]
        self.limits = recipe.limits

    def forced_experts(self, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        unknown = [n for n in names if n not in self.pool]
        if unknown:
            raise bad_request(f"unknown expert {unknown[0]!r} in mova.experts; the pool is "
                              f"{self.pool}", param="mova.experts", code="unknown_expert")
        return [n for n in self.pool if n in set(names)]

    def decode_params(self, req: ChatRequest) -> DecodeParams:
        gen = self.config.generation
        max_new = req.max_tokens or req.max_completion_tokens or gen.max_new_tokens
        if max_new > self.limits.max_tokens:
            raise bad_request(f"max_tokens={max_new} exceeds this server's limit of "
                              f"{self.limits.max_tokens}", param="max_tokens")
        if req.temperature is None:
            do_sample, temperature = gen.do_sample, gen.temperature
        else:
            do_sample, temperature = req.temperature > 0, req.temperature or 1.0
        return DecodeParams(max_new_tokens=max_new, do_sample=do_sample,
                            temperature=temperature,
                            top_p=gen.top_p if req.top_p is None else req.top_p,
                            seed=req.seed, stop=tuple(stop_list(req.stop)))

    def prompt_ids(self, conv: Conversation, params: DecodeParams, route: bool) -> list[int]:
        """The answer prompt's token ids; a 400 if it (or the routing prompt) does not fit."""
        context = self.config.llm.max_position_embeddings
        try:
            turns = validate_turns(conv.turns, for_generation=True)
            ids = tokenize_conversation(turns, self.tokenizer, self.template,
                                        self.config.num_image_tokens,
                                        for_generation=True)["input_ids"]
        except ValueError as exc:
            raise bad_request(f"messages: {exc}", param="messages") from None
        if len(ids) + params.max_new_tokens > context:
            raise bad_request(f"the prompt has {len(ids)} tokens and max_tokens is "
                              f"{params.max_new_tokens}; together they exceed the model's "
                              f"context of {context} tokens", param="messages",
                              code="context_length_exceeded")
        if route:
            try:
                text = build_routing_prompt(conv.questions[-1], self.descriptions,
                                            image_token=IMAGE_TOKEN,
                                            max_experts=self.config.routing.max_experts)
                routing = tokenize_conversation([{"from": "human", "value": text}],
                                                self.tokenizer, self.template,
                                                self.config.num_routing_tokens,
                                                for_generation=True)["input_ids"]
            except ValueError as exc:
                raise bad_request(f"messages: {exc}", param="messages") from None
            if len(routing) + self.config.routing.max_new_tokens > context:
                raise bad_request(f"the question is too long to route ({len(routing)} tokens "
                                  f"with the routing prompt; context {context})",
                                  param="messages", code="context_length_exceeded")
        return ids


class Pipeline:
    """Calls the deployments for one request (the ingress maps their failures to HTTP)."""

    def __init__(self, adapter, llm, experts: dict[str, Any], metrics=None) -> None:
        self.adapter = adapter
        self.llm = llm
        self.experts = experts
        self.metrics = metrics

    async def vision(self, prep: Prepared, *, skip_experts: bool = False) -> Vision:
        """Encode, route (unless forced), run the routed experts in parallel, fuse.
        ``skip_experts`` (readiness probe) routes but fuses no expert."""
        marks = [time.perf_counter()]
        encoded = await self.adapter.encode.remote({"image": prep.image,
                                                    "questions": prep.questions})
        marks.append(time.perf_counter())
        reply = None
        if prep.forced is None:
            routing = await self.llm.route.remote({"routing_tokens": encoded["routing_tokens"],
                                                   "question": prep.questions[-1]})
            experts, reply = list(routing["experts"]), routing["reply"]
        else:
            experts = list(prep.forced)
        if skip_experts:
            experts = []
        marks.append(time.perf_counter())
        for name in experts:
            if self.metrics is not None:
                self.metrics.expert_calls.labels(expert=name).inc()
        feats = await asyncio.gather(*(self.experts[n].features.remote(prep.image)
                                       for n in experts))
        marks.append(time.perf_counter())
        fused = await self.adapter.fuse.remote({"features": encoded["features"],
                                                "experts": dict(zip(experts, feats,
                                                                    strict=True))})
        marks.append(time.perf_counter())
        steps = {name: round((b - a) * 1e3, 2) for name, a, b in
                 zip(("encode", "route", "experts", "fuse"), marks[:-1], marks[1:], strict=True)}
        return Vision(experts=experts, forced=prep.forced is not None, routing_reply=reply,
                      gate_weights=fused["gate_weights"], image_tokens=fused["image_tokens"],
                      seconds=marks[-1] - marks[0], steps_ms=steps)

    def answer(self, prep: Prepared, vision: Vision, *, stream: bool = True):
        """The LLM's answer stream (a ``DeploymentResponseGenerator`` of event dicts); with
        ``stream=False`` it carries the final event only."""
        params = dataclasses.asdict(prep.params)
        params["stop"] = list(params["stop"])
        return self.llm.options(stream=True).answer.remote(
            {"image_tokens": vision.image_tokens, "prompt_ids": prep.prompt_ids,
             "params": params, "stream": stream})


def check_event(event: dict[str, Any]) -> dict[str, Any]:
    """Raise for an error event of the answer stream."""
    if event.get("error"):
        if event.get("bad_request"):
            raise RequestError(event["error"], param="messages")
        raise RuntimeError(f"answer decode failed: {event['error']}")
    return event


async def collect(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The final event of an answer stream."""
    async for event in stream:
        if check_event(event).get("done"):
            return event
    raise RuntimeError("the answer stream ended without a final event")

"""One request through the deployments: checks first, then the MoVA flow.

preprocess + base + text (Adapter) -> routing decode (LLM) -> the routed experts, in parallel
(one deployment each) -> MoV-Adapter fusion (Adapter, reusing the base features) -> the answer
decode, streamed (LLM). Everything that can be checked without a model (the image, the prompt
length, the parameters, forced expert names) is checked before the first model call.

Every hop carries the request's deadline: the callee drops work whose deadline has passed, and
the caller stops waiting at the deadline and cancels the call (which ends the callee's work
for it). Tensors travel by value.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer

from mova.builders import ensure_image_token, routing_descriptions
from mova.checkpoint import expert_cache_keys, llm_folder, load_config
from mova.config import MoVAConfig
from mova.conversation import get_template, tokenize_conversation, validate_turns
from mova.decoding import DecodeParams
from mova.experts.registry import resolve_expert
from mova.routing import render_routing_prompt
from mova.tokenizers import IMAGE_TOKEN
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.wire import MoVAInfo
from pipelines.serve.errors import DeadlineExceeded, ReplicaUnhealthy, RequestError, bad_request
from pipelines.serve.expert_cache import ExpertCache, open_caches
from pipelines.serve.metrics import metric
from pipelines.serve.openai_request import ChatRequest, Conversation, stop_list
from pipelines.serve.recipe import ServeRecipe


@dataclass
class Prepared:
    """A checked request, ready for the model."""

    image: Any  # the decoded RGB PIL image (travels by value)
    questions: list[str]
    prompt_ids: list[int]
    params: DecodeParams
    forced: list[str] | None
    deadline: float = float("inf")  # time.time() seconds
    debug: bool = False  # return the adapter's router logits and top-k picks
    image_hash: str = ""  # sha256 of the image's bytes, the experts' cache key ("": no cache)


@dataclass
class Vision:
    """What the vision side decided and produced for one request."""

    experts: list[str]
    forced: bool
    routing_reply: str | None
    gate_weights: list[list[float]]
    image_tokens: Any  # (1, tokens, D) tensor
    seconds: float
    steps_ms: dict[str, float] = field(default_factory=dict)
    debug: dict[str, Any] = field(default_factory=dict)  # router_logits, top_k (mova.debug)

    def extension(self, pool: list[str]) -> MoVAInfo:
        """The response's ``mova`` field."""
        return MoVAInfo(experts=self.experts, forced=self.forced,
                        routing_reply=self.routing_reply, pool=pool,
                        gate_weights=self.gate_weights, vision_ms=round(self.seconds * 1e3, 2),
                        vision_steps_ms=self.steps_ms, **self.debug)


class PromptChecker:
    """The LLM-side facts the ingress needs to check a request: tokenizer, template, context
    length, pool and generation defaults (loaded from the checkpoint, no weights)."""

    def __init__(self, checkpoint: str, recipe: ServeRecipe) -> None:
        checkpoint = local_checkpoint(checkpoint, parts=["meta"])  # no weights
        self.config: MoVAConfig = load_config(checkpoint)
        llm_dir = llm_folder(checkpoint)
        self.tokenizer = ensure_image_token(AutoTokenizer.from_pretrained(llm_dir))
        self.template = get_template(self.config.llm.chat_template)
        self.pool = self.config.expert_names
        self.descriptions = routing_descriptions(self.config)
        self.limits = recipe.limits
        self.max_image_side = recipe.limits.max_image_side or pool_image_side(self.config)
        self.hash_images = recipe.feature_cache.enabled
        self.caches = open_caches(recipe.feature_cache, expert_cache_keys(checkpoint))

    def image_key(self, data: bytes) -> str:
        """The image's key in the experts' feature cache: the sha256 of its bytes (equal
        bytes decode to equal pixels), or "" when the cache is off (nothing is hashed)."""
        return hashlib.sha256(data).hexdigest() if self.hash_images else ""

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
        # unasked, an answer may run to the checkpoint's default or the server's limit
        max_new = req.max_tokens or req.max_completion_tokens or \
            min(gen.max_new_tokens, self.limits.max_tokens)
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
        chars = sum(len(t["value"]) for t in conv.turns)
        if chars > self.limits.max_prompt_chars:
            raise bad_request(f"the messages hold {chars} characters; at most "
                              f"{self.limits.max_prompt_chars} are accepted", param="messages",
                              code="context_length_exceeded")
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
                text = render_routing_prompt(self.config.routing.prompt, conv.questions[-1],
                                             self.descriptions, image_token=IMAGE_TOKEN,
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

    def __init__(self, adapter, llm, experts: dict[str, Any],
                 caches: dict[str, ExpertCache] | None = None) -> None:
        self.adapter = adapter
        self.llm = llm
        self.experts = experts
        self.caches = caches or {}  # expert -> its features in this node's cache

    async def _expert_features(self, name: str, item: dict[str, Any], deadline: float) -> Any:
        """One expert's features of the request's image: from the node's cache when it holds
        them (the expert is not called), else from the expert (then cached)."""
        async def compute(it: dict[str, Any]) -> Any:
            return await call(self.experts[name].features.remote(it), deadline)

        cache = self.caches.get(name)
        return await (compute(item) if cache is None else cache.features(item, compute))

    async def vision(self, prep: Prepared, *, skip_experts: bool = False) -> Vision:
        """Encode, route (unless forced), run the routed experts in parallel, fuse.
        ``skip_experts`` (readiness probe) routes but fuses no expert."""
        deadline = prep.deadline
        marks = [time.perf_counter()]
        encoded = await call(self.adapter.encode.remote(
            {"image": prep.image, "questions": prep.questions, "deadline": deadline}), deadline)
        marks.append(time.perf_counter())
        reply = None
        if prep.forced is None:
            routing = await call(self.llm.route.remote(
                {"routing_tokens": encoded["routing_tokens"], "question": prep.questions[-1],
                 "deadline": deadline}), deadline)
            if "error_event" in routing:
                check_event(routing["error_event"])
            experts, reply = list(routing["experts"]), routing["reply"]
        else:
            experts = list(prep.forced)
        if skip_experts:
            experts = []
        marks.append(time.perf_counter())
        source = "forced" if prep.forced is not None else "routed"
        for name in experts:
            metric("expert_routed").inc(tags={"expert": name, "source": source})
        item = {"image": prep.image, "image_hash": prep.image_hash, "deadline": deadline}
        feats = await asyncio.gather(*(self._expert_features(n, item, deadline)
                                       for n in experts))
        marks.append(time.perf_counter())
        fused = await call(self.adapter.fuse.remote(
            {"base": encoded["base"], "text": encoded["text"],
             "experts": dict(zip(experts, feats, strict=True)), "deadline": deadline,
             "debug": prep.debug}), deadline)
        marks.append(time.perf_counter())
        steps = {name: round((b - a) * 1e3, 2) for name, a, b in
                 zip(("encode", "route", "experts", "fuse"), marks[:-1], marks[1:], strict=True)}
        return Vision(experts=experts, forced=prep.forced is not None, routing_reply=reply,
                      gate_weights=fused["gate_weights"], image_tokens=fused["image_tokens"],
                      seconds=marks[-1] - marks[0], steps_ms=steps,
                      debug=fused.get("debug") or {})

    def answer(self, prep: Prepared, vision: Vision, *, stream: bool = True):
        """The LLM's answer stream (a ``DeploymentResponseGenerator`` of event dicts); with
        ``stream=False`` it carries the final event only."""
        params = dataclasses.asdict(prep.params)
        params["stop"] = list(params["stop"])
        params.pop("constraint", None)
        return self.llm.options(stream=True).answer.remote(
            {"image_tokens": vision.image_tokens, "prompt_ids": prep.prompt_ids,
             "params": params, "stream": stream, "deadline": prep.deadline})


async def call(response: Any, deadline: float) -> Any:
    """Await one deployment call until ``deadline`` (``time.time()`` seconds); a call that
    times out or is cancelled is cancelled downstream too."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.time())):
            return await response
    except BaseException:
        response.cancel()
        raise


def pool_image_side(config: MoVAConfig) -> int:
    """The largest image side any encoder of the checkpoint reads (at least 1024): the
    default cap on request images' width and height."""
    sides = [config.base.image_size]
    for expert in config.experts:
        size = resolve_expert(expert).size
        sides += [size.image_size, getattr(size, "source_size", 0) or 0]
    return max(1024, *sides)


def check_event(event: dict[str, Any]) -> dict[str, Any]:
    """Raise for an error event of the LLM (routing or answer)."""
    if event.get("error"):
        if event.get("bad_request"):
            raise RequestError(event["error"], param="messages")
        if event.get("timeout"):
            raise DeadlineExceeded(event["error"])
        if event.get("unavailable"):
            raise ReplicaUnhealthy(event["error"])
        raise RuntimeError(f"decoding failed: {event['error']}")
    return event


async def collect(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The final event of an answer stream."""
    async for event in stream:
        if check_event(event).get("done"):
            return event
    raise RuntimeError("the answer stream ended without a final event")

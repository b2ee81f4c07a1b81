"""The LLM deployment: the routing decode and the streamed answer decode, continuously batched.

Both passes of every request go through one engine per replica (the recipe's ``llm.engine``):
vLLM (:class:`pipelines.serve.vllm_engine.VLLMEngine`: paged KV cache, prefix cache, mixed
prompts of token ids and image embeddings) or our loop over ``transformers``
(:class:`pipelines.serve.engine.DecodeEngine`). A routing row and, later, an answer row join
the running batch at its next step, each with its own settings (the routing row under the
routing-reply constraint of :mod:`mova.routing_constraint` unless the recipe turns it off).
Every call carries its request's deadline; a cancelled call (caller timed out, client gone)
ends its row within one step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from mova.decoding import DecodeParams
from mova.routing_constraint import constrained_routing_params
from pipelines.common.llm_engine import resolve_engine
from pipelines.serve.batching import faults_enabled
from pipelines.serve.deployments import (
    apply_threads,
    load_for_engine,
    load_serving_model,
    process_info,
)
from pipelines.serve.engine import DecodeEngine, Prompt
from pipelines.serve.errors import ReplicaUnhealthy
from pipelines.serve.metrics import metric

log = logging.getLogger(__name__)


@serve.deployment(name="LLM")
class LLMServer:
    """Routes (which experts?) and answers (streamed text) with the same LLM weights."""

    def __init__(self, checkpoint: str, device: str = "auto",
                 constrained_routing: bool = True, engine: dict[str, Any] | None = None
                 ) -> None:
        engine = engine or {"kind": "torch"}
        self.kind = resolve_engine(engine["kind"])
        # the threads it was given, before an engine sizes itself by them (vLLM binds as many
        # CPUs); Serve's reconfigure comes after __init__
        apply_threads({"torch_threads": engine.get("threads", 0)})
        if self.kind == "vllm":
            self.model, folder = load_for_engine(checkpoint, device)
            # vLLM is optional and takes ~9 s to import: only replicas that run it import it
            from pipelines.serve.vllm_engine import start_vllm
            self.engine = start_vllm(folder, self.model, engine)
        else:
            self.model = load_serving_model(checkpoint, device, keep=("llm",))
            self.engine = DecodeEngine(self.model.new_decoder)
        self.routing_params = constrained_routing_params(self.model, constrained_routing)
        self._monitor: asyncio.Task | None = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        apply_threads(config)
        self.engine.max_rows = int(config.get("max_batch_size", 16))
        self.engine.stall_grace_s = float(config.get("stall_grace_s", 10.0))

    async def check_health(self) -> None:
        await self.engine.watch()

    def __del__(self) -> None:
        """Serve stops this replica: say why (the watchdog's reason, or none: scaled down or
        redeployed) and what it still held."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            summary = engine.summary()
            log.warning("LLM replica stopping: %s; held %d queued and %d decoding row(s)",
                        engine.unhealthy or "healthy (scaled down or redeployed)",
                        summary["queued"], summary["waiting"])
            stop = getattr(engine, "shutdown", None)
            if stop is not None:  # vLLM: its engine processes end with the replica
                try:
                    stop()
                except Exception as exc:  # the replica is going away anyway
                    log.warning("LLM engine shutdown failed: %r", exc)

    def _watch(self) -> None:
        """A monitor task: a stuck step fails its waiting requests at once (503) even
        between Serve's health checks."""
        if self._monitor is None:
            async def monitor() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    try:
                        await self.engine.watch()
                    except ReplicaUnhealthy:
                        return
            self._monitor = asyncio.get_running_loop().create_task(monitor())

    async def route(self, item: dict[str, Any]) -> dict[str, Any]:
        """``{"routing_tokens": (1, R, D), "question", "deadline"}`` -> the chosen experts and
        the raw routing reply."""
        self._watch()
        model, tokens = self.model, item["routing_tokens"]

        ids = model.routing_prompt_ids([item["question"]], tokens.shape[1])[0]
        prompt = self._prompt(ids, tokens)
        final = None
        async for event in self.engine.stream(prompt, self.routing_params, item["deadline"]):
            final = event
        assert final is not None
        if final.get("error"):
            return {"error_event": final}
        routing = model.parse_routes([final["text"]])
        return {"experts": routing.experts[0], "reply": final["text"]}

    async def answer(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's answer: events ``{"delta", "done", "text", ...}``, or one final
        error event. With ``item["stream"]`` false only the final event is sent (no per-token
        messages between processes)."""
        self._watch()
        raw = item["params"]
        params = DecodeParams(**{**raw, "stop": tuple(raw["stop"])})

        prompt = self._prompt(item["prompt_ids"], item["image_tokens"])
        streaming = item.get("stream", True)
        async for event in self.engine.stream(prompt, params, item["deadline"]):
            if streaming or event.get("done") or event.get("error"):
                yield event

    def _prompt(self, ids: list[int], image_tokens: Any) -> Any:
        """What the engine takes: a :class:`Prompt` for vLLM, a builder of the padded
        embeddings for the torch loop (run on its decode thread)."""
        if self.kind == "vllm":
            return Prompt(list(ids), image_tokens)
        model = self.model

        def build():
            return model.prompt_embeddings([ids], image_tokens.to(model.device))
        return build

    def info(self) -> dict[str, Any]:
        data, summary = process_info("LLM"), self.engine.summary()
        data["rss_bytes"] += summary.get("engine_rss_bytes", 0)  # vLLM's engine processes
        metric("resident_memory_bytes").set(data["rss_bytes"])
        return {**data, "batches": {"decode": summary}}

    async def inject_stall(self, seconds: float) -> None:
        """Test-only (``MOVA_SERVE_FAULT_INJECTION=1``): the next decode step blocks."""
        if not faults_enabled():
            raise RuntimeError("fault injection is disabled on this server")
        if self.kind == "vllm":
            self.engine.pause(seconds)  # its processes stop: no output, no CPU
        else:
            self.engine.stall_next_s = seconds

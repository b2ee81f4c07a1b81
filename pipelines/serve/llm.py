"""The LLM deployment: the routing decode and the streamed answer decode, both batched.

Routing batches concurrent requests into one :meth:`mova.model.MoVAModel.route` call. Answers
batch with a streaming ``@serve.batch`` generator: every row of a batch shares one
:class:`mova.decoding.BatchDecoder` (each with its own sampling settings), and each request's
stream ends as soon as its own row is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from mova.decoding import DecodeParams
from pipelines.serve.deployments import BatchControl, fetch, load_serving_model, process_info

log = logging.getLogger(__name__)


@serve.deployment(name="LLM")
class LLMServer:
    """Routes (which experts?) and answers (streamed text) with the same LLM weights."""

    def __init__(self, checkpoint: str, device: str = "auto") -> None:
        self.model = load_serving_model(checkpoint, device, keep=("llm",))
        self.batching = {m: BatchControl(self, m) for m in ("route", "_answer_batch")}

    def reconfigure(self, config: dict[str, Any]) -> None:
        for control in self.batching.values():
            control.configure(config)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def route(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per request ``{"routing_tokens": (1, R, D), "question"}`` -> the chosen experts and
        the raw routing reply."""
        with self.batching["route"].run(len(items)):
            return await asyncio.to_thread(self._route, items)

    def _route(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch

        tokens = torch.cat([item["routing_tokens"] for item in items]).to(self.model.device)
        with torch.no_grad():
            result = self.model.route(tokens, [item["question"] for item in items])
        return [{"experts": result.experts[i], "reply": result.replies[i]}
                for i in range(len(items))]

    async def answer(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's answer: events ``{"delta", "done", "text", ...}`` and, on
        failure, one ``{"error", "bad_request"}`` event. With ``item["stream"]`` false only
        the final event is sent (no per-token messages between processes)."""
        async for events in self._answer_batch(item):  # ends right after the final event
            for event in events:
                yield event

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002, max_concurrent_batches=2)
    async def _answer_batch(self, items: list[dict[str, Any]]) -> AsyncIterator[list[Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def push(pairs: list[tuple[int, dict[str, Any]]] | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, pairs)

        streaming = [item.get("stream", True) for item in items]
        with self.batching["_answer_batch"].run(len(items)):
            worker = loop.run_in_executor(None, self._decode, items, push)
            open_rows, ended = set(range(len(items))), set()
            while open_rows:
                pairs = await events.get()
                if pairs is None:
                    break
                slots: list[Any] = [[] for _ in items]
                closed = set()
                for row, event in pairs:
                    final = bool(event.get("done") or event.get("error"))
                    if row in open_rows and (final or streaming[row]):
                        slots[row].append(event)
                    if final:
                        closed.add(row)
                if any(slots) or closed:
                    yield [StopIteration if i in ended else slots[i] for i in range(len(items))]
                    ended |= open_rows & closed
                open_rows -= closed
            await worker

    def _decode(self, items: list[dict[str, Any]], push) -> None:
        """Worker thread: decode every row of the batch together, pushing events as they
        come. A row that cannot start (e.g. too long) fails alone."""
        import torch

        model, decoder = self.model, self.model.new_decoder()
        try:
            for i, item in enumerate(items):
                try:
                    params = DecodeParams(**{**item["params"],
                                             "stop": tuple(item["params"]["stop"])})
                    tokens = fetch(item["image_tokens"]).to(model.device)
                    embeds, mask = model.prompt_embeddings([item["prompt_ids"]], tokens)
                    decoder.add(embeds, mask, [params], keys=[i])
                except Exception as exc:  # reported to the waiting request, never raised
                    push([(i, _error_event(exc))])
            with torch.no_grad():
                while len(decoder):
                    events = decoder.step()
                    if events:
                        push([(e.row, e.to_dict()) for e in events])
        except Exception as exc:
            log.warning("answer decode failed: %s", exc)
            push([(i, _error_event(exc)) for i in decoder.keys()])
        finally:
            push(None)

    def info(self) -> dict[str, Any]:
        return {**process_info("LLM"),
                "batches": {m.strip("_"): c.summary() for m, c in self.batching.items()}}


def _error_event(exc: Exception) -> dict[str, Any]:
    return {"error": str(exc), "bad_request": isinstance(exc, ValueError)}

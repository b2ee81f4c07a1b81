"""The LLM deployment: the routing decode and the streamed answer decode, both batched.

Routing batches concurrent requests into one :meth:`mova.model.MoVAModel.route` call. Answers
batch with a streaming ``@serve.batch`` generator: rows with the same sampling settings share
one ``generate`` call (see :class:`pipelines.serve.streaming.DecodeParams.group_key`), and each
request's stream ends as soon as its own row is done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from ray import serve

from pipelines.serve.deployments import BatchControl, fetch, load_serving_model, process_info
from pipelines.serve.streaming import DecodeParams, stream_decode

log = logging.getLogger(__name__)


class RngLock:
    """Seeded sampling owns torch's global RNG while it decodes, so it runs alone; every other
    decode (greedy, unseeded sampling, routing) may share the model. Writers go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@serve.deployment(name="LLM")
class LLMServer:
    """Routes (which experts?) and answers (streamed text) with the same LLM weights."""

    def __init__(self, checkpoint: str, device: str = "auto") -> None:
        self.model = load_serving_model(checkpoint, device, keep=("llm",))
        self._rng = RngLock()
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
        with self._rng.shared(), torch.no_grad():
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
            worker = loop.run_in_executor(None, self._decode_groups, items, push)
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

    def _decode_groups(self, items: list[dict[str, Any]], push) -> None:
        """Worker thread: decode each group of compatible rows, pushing events as they come."""
        import torch

        groups: dict[tuple, list[int]] = defaultdict(list)
        params = [DecodeParams(**{**item["params"], "stop": tuple(item["params"]["stop"])})
                  for item in items]
        for i, p in enumerate(params):
            groups[p.group_key()].append(i)
        try:
            for key, rows in groups.items():
                lock = self._rng.exclusive() if key[0] == "seeded" else self._rng.shared()
                try:
                    tokens = torch.cat([fetch(items[i]["image_tokens"]) for i in rows])
                    with lock:
                        for step in stream_decode(self.model, [items[i]["prompt_ids"]
                                                               for i in rows],
                                                  tokens.to(self.model.device),
                                                  [params[i] for i in rows]):
                            push([(rows[e.row], e.to_dict()) for e in step])
                except Exception as exc:  # reported to the waiting requests, never raised
                    log.warning("answer decode failed: %s", exc)
                    error = {"error": str(exc), "bad_request": isinstance(exc, ValueError)}
                    push([(i, error) for i in rows])
        finally:
            push(None)

    def info(self) -> dict[str, Any]:
        return {**process_info("LLM"),
                "batches": {m.strip("_"): c.summary() for m, c in self.batching.items()}}

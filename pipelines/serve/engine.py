"""Continuous batching for the LLM deployment: one KV-cached batch, one decode thread.

Every routing row and every answer row of every request shares one
:class:`mova.decoding.BatchDecoder`. A new row joins the running batch at the next step (its
prompt is prefilled with the other newcomers), and leaves it when it ends, when its request is
cancelled (the caller timed out or the client went away: within one step) or when its deadline
passes (within one step, with a timeout event). So a decode step always serves every row that
is ready, and no row decodes for a caller that is gone.

The thread publishes what it is doing; :meth:`DecodeEngine.check` (called by the replica's
``check_health`` and a monitor task) turns the engine unhealthy when a step has run
``stall_grace_s`` past the latest deadline of its rows and its thread is stuck, not slow (no
CPU used over the last grace period: :mod:`pipelines.serve.progress`): every waiting request
then gets an ``unavailable`` event (a 503 at the ingress) and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from mova.decoding import DecodeParams
from pipelines.serve.errors import ReplicaUnhealthy
from pipelines.serve.metrics import stage_metrics
from pipelines.serve.progress import StallJudge

log = logging.getLogger(__name__)

Build = Callable[[], tuple[Any, Any]]  # () -> (prompt embeddings (1, T, D), mask (1, T))


@dataclass(frozen=True)
class Prompt:
    """One row's prompt for an engine that splices the image itself (vLLM): token ids with
    the image run (the model's image token) and the image tokens, (L, D) or (1, L, D)."""

    ids: list[int]
    image_tokens: Any


@dataclass
class _Row:
    key: int
    build: Build
    params: DecodeParams
    deadline: float  # time.time() seconds
    loop: asyncio.AbstractEventLoop = field(repr=False)
    events: asyncio.Queue = field(repr=False)


def error_event(message: str, **kind: bool) -> dict[str, Any]:
    """A final error event: ``bad_request`` (400), ``timeout`` (408), ``unavailable`` (503),
    none of them: an internal error (500)."""
    return {"error": message, **kind}


class DecodeEngine:
    """Rows from many requests decoded together by one thread."""

    def __init__(self, new_decoder: Callable[[], Any], *, max_rows: int = 16,
                 stall_grace_s: float = 10.0) -> None:
        self.new_decoder = new_decoder
        self.max_rows = max_rows
        self.stall_grace_s = stall_grace_s
        self.unhealthy: str | None = None
        self.stall_next_s = 0.0  # test-only fault injection
        self.steps = self.row_steps = 0
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._inbox: deque[_Row] = deque()
        self._cancelled: set[int] = set()
        self._waiting: dict[int, _Row] = {}  # every row not yet answered (event-loop side)
        self._step: tuple[float, float, int] | None = None  # (start, latest deadline, rows)
        self._metrics = stage_metrics("decode")
        self._judge = StallJudge(stall_grace_s)
        self._thread = threading.Thread(target=self._run, name="mova-decode", daemon=True)
        self._thread.start()

    # ---- event-loop side -----------------------------------------------------------------
    async def watch(self) -> None:
        """Called often by the replica's monitor and health check: see :meth:`check`."""
        self.check()

    async def stream(self, build: Build, params: DecodeParams, deadline: float
                     ) -> AsyncIterator[dict[str, Any]]:
        """Decode one row; yields its event dicts, the last one ``done`` or ``error``."""
        self.check()
        loop = asyncio.get_running_loop()
        row = _Row(next(self._keys), build, params, deadline, loop, asyncio.Queue())
        self._waiting[row.key] = row
        with self._cond:
            self._inbox.append(row)
            self._metrics.queue(len(self._inbox))
            self._cond.notify()
        finished = False
        try:
            while True:
                # the thread ends a row at its deadline; this is the backstop if it cannot
                async with asyncio.timeout(max(0.0, deadline - time.time()) + 2.0):
                    event = await row.events.get()
                final = bool(event.get("done") or event.get("error"))
                finished = final
                yield event
                if final:
                    return
        except TimeoutError:
            finished = False
            yield error_event("the request's deadline passed during decoding", timeout=True)
        finally:
            self._waiting.pop(row.key, None)
            if not finished:
                self.cancel(row.key)

    def cancel(self, key: int) -> None:
        """End a row within one step (no more events for it)."""
        with self._cond:
            for row in self._inbox:
                if row.key == key:
                    self._inbox.remove(row)
                    return
            self._cancelled.add(key)
            self._cond.notify()

    def check(self) -> None:
        """Raise :class:`ReplicaUnhealthy` when the decode thread is stuck or gone."""
        if self.unhealthy is None:
            step = self._step
            now = time.time()
            overdue = now - max(step[0], step[1]) - self.stall_grace_s if step else 0.0
            self._judge.grace_s = self.stall_grace_s
            reason = self._judge.stuck(overdue) if overdue > 0 else None
            if reason:
                self._trip(f"decode: a step over {step[2]} rows has run {now - step[0]:.1f} s, "
                           f"past its rows' deadline + stall_grace_s; {reason}")
            elif not self._thread.is_alive():
                self._trip("decode: the decode thread ended")
        if self.unhealthy:
            raise ReplicaUnhealthy(self.unhealthy)

    def _trip(self, reason: str) -> None:
        self.unhealthy = reason
        log.error("replica unhealthy: %s", reason)
        self._metrics.unhealthy()
        for row in list(self._waiting.values()):
            self._emit(row, error_event(reason, unavailable=True))

    def summary(self) -> dict[str, Any]:
        return {"engine": "torch", "steps": self.steps, "row_steps": self.row_steps,
                "mean_rows": round(self.row_steps / self.steps, 2) if self.steps else 0.0,
                "queued": len(self._inbox), "waiting": len(self._waiting),
                "unhealthy": self.unhealthy}

    # ---- the decode thread -----------------------------------------------------------------
    def _emit(self, row: _Row, event: dict[str, Any]) -> None:
        try:
            row.loop.call_soon_threadsafe(row.events.put_nowait, event)
        except RuntimeError:  # the replica's loop is closing
            pass

    def _run(self) -> None:
        self._judge.bind()
        decoder, rows = self.new_decoder(), {}
        while True:
            with self._cond:
                while not self._inbox and not rows and not self._cancelled:
                    self._cond.wait(1.0)
                cancelled, self._cancelled = self._cancelled, set()
                room = max(0, self.max_rows - len(rows))
                new = [self._inbox.popleft() for _ in range(min(room, len(self._inbox)))]
                self._metrics.queue(len(self._inbox))
            try:
                self._admit(decoder, rows, new, cancelled)
                if rows:
                    self._advance(decoder, rows)
            except Exception as exc:  # a failed step fails its rows, never the thread
                log.warning("decode step failed: %r", exc)
                for row in rows.values():
                    self._emit(row, error_event(f"decoding failed: {exc}"))
                decoder, rows = self.new_decoder(), {}

    def _admit(self, decoder, rows: dict[int, _Row], new: list[_Row],
               cancelled: set[int]) -> None:
        now = time.time()
        for key in cancelled & set(rows):
            decoder.cancel(key)
            rows.pop(key)
        for key, row in list(rows.items()):
            if now >= row.deadline:
                decoder.cancel(key)
                rows.pop(key)
                self._metrics.expired()
                self._emit(row, error_event("the request's deadline passed during decoding",
                                            timeout=True))
        for row in new:
            if now >= row.deadline:
                self._metrics.expired()
                self._emit(row, error_event("the request's deadline passed before decoding",
                                            timeout=True))
                continue
            try:
                embeds, mask = row.build()
                decoder.add(embeds, mask, [row.params], keys=[row.key])
            except Exception as exc:  # this row alone fails (e.g. too long)
                self._emit(row, error_event(str(exc), bad_request=isinstance(exc, ValueError)))
                continue
            rows[row.key] = row

    def _advance(self, decoder, rows: dict[int, _Row]) -> None:
        start = time.time()
        self._step = (start, max(r.deadline for r in rows.values()), len(rows))
        self._judge.started()
        try:
            stall, self.stall_next_s = self.stall_next_s, 0.0
            if stall:
                time.sleep(stall)  # test-only: a step that hangs
            events = decoder.step()
        finally:
            self._step = None
        self.steps += 1
        self.row_steps += len(rows)
        self._metrics.batch(len(rows), time.time() - start)
        for event in events:
            row = rows.get(event.row)
            if row is None:
                continue
            self._emit(row, event.to_dict())
            if event.done:
                rows.pop(event.row)

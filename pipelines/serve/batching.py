"""Deadline-aware batching for the vision deployments, with a watchdog.

A :class:`Batcher` collects concurrent calls of one replica method into batches and runs each
batch in the replica's own worker thread, so the event loop never blocks. Unlike
``@serve.batch`` it knows every request's deadline:

- an item whose deadline has passed is answered with :class:`DeadlineExceeded` and never run;
- the next batch takes everything that queued while the previous one ran (so batches grow
  with load), waiting ``batch_wait_timeout_s`` for company only when the replica was idle;
- a batch still running ``stall_grace_s`` after the latest deadline it serves fails its
  callers (their time is up) and is judged (:mod:`pipelines.serve.progress`): if its thread
  still computes it is slow, and the replica keeps it; if it used no CPU over the last grace
  period it is stuck (a thread blocked forever is one way): the batcher turns unhealthy,
  fails every waiting item with :class:`ReplicaUnhealthy` (503 with ``Retry-After`` at the
  ingress) and the replica's ``check_health`` fails from then on, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipelines.serve.errors import DeadlineExceeded, ReplicaUnhealthy
from pipelines.serve.metrics import stage_metrics
from pipelines.serve.progress import StallJudge

log = logging.getLogger(__name__)

FAULTS_ENV = "MOVA_SERVE_FAULT_INJECTION"


def faults_enabled() -> bool:
    """Test-only stall injection is on only when this environment variable is ``1``."""
    return os.environ.get(FAULTS_ENV) == "1"


@dataclass
class _Item:
    payload: Any
    deadline: float  # time.time() seconds
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchSettings:
    """The ``user_config`` of a deployment, as the batcher reads it."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.002
    stall_grace_s: float = 10.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchSettings:
        return cls(max_batch_size=int(config.get("max_batch_size", 8)),
                   batch_wait_timeout_s=float(config.get("batch_wait_timeout_s", 0.002)),
                   stall_grace_s=float(config.get("stall_grace_s", 10.0)))


class Batcher:
    """Batches calls of ``work(payloads) -> results`` (one result per payload, same order)."""

    def __init__(self, stage: str, work: Callable[[list[Any]], Sequence[Any]],
                 settings: BatchSettings | None = None) -> None:
        self.stage = stage
        self.work = work
        self.settings = settings or BatchSettings()
        self.queue: deque[_Item] = deque()
        self.unhealthy: str | None = None
        self.running: tuple[float, float, int] | None = None  # (start, deadline, size)
        self.batches = self.items = 0
        self.busy_s = 0.0  # seconds spent in batches (cumulative)
        self.stall_next_s = 0.0  # test-only fault injection
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"mova-{stage}")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._metrics = stage_metrics(stage)
        self._judge = StallJudge(self.settings.stall_grace_s)

    # ---- called from the replica's event loop ------------------------------------------------
    async def submit(self, payload: Any, deadline: float) -> Any:
        """Queue one item and wait for its result (or its deadline, or the replica's end)."""
        self._start()
        if self.unhealthy:
            raise ReplicaUnhealthy(self.unhealthy)
        if time.time() >= deadline:
            self._metrics.expired()
            raise DeadlineExceeded(f"{self.stage}: the request's deadline passed before it "
                                   "reached the model")
        item = _Item(payload, deadline, asyncio.get_running_loop().create_future())
        self.queue.append(item)
        self._metrics.queue(len(self.queue))
        assert self._wake is not None
        self._wake.set()
        try:
            return await item.future
        finally:
            if not item.future.done():  # cancelled by the caller: it leaves the queue
                item.future.cancel()

    def check(self) -> None:
        """Raise if this batcher is stuck (Serve's ``check_health`` calls it)."""
        if self.unhealthy is None and self.running is not None:
            start, deadline, size = self.running
            now = time.time()
            overdue = now - deadline - self.settings.stall_grace_s
            reason = self._judge.stuck(overdue) if overdue > 0 else None
            if reason:
                self._trip(f"{self.stage}: a batch of {size} has run {now - start:.1f} s, "
                           f"{now - deadline:.1f} s past its requests' deadline; {reason}")
        if self.unhealthy is None and self._task is not None and self._task.done():
            self._trip(f"{self.stage}: the batch loop ended")
        if self.unhealthy:
            raise ReplicaUnhealthy(self.unhealthy)

    def summary(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.items,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0,
                "queued": len(self.queue), "unhealthy": self.unhealthy}

    # ---- internals ---------------------------------------------------------------------------
    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: batch loop failed: %r", self.stage, task.exception())
            self._trip(f"{self.stage}: the batch loop failed ({task.exception()!r})")

    def _trip(self, reason: str) -> None:
        if self.unhealthy:
            return
        self.unhealthy = reason
        log.error("replica unhealthy: %s", reason)
        self._metrics.unhealthy()
        while self.queue:
            item = self.queue.popleft()
            if not item.future.done():
                item.future.set_exception(ReplicaUnhealthy(reason))

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        now = time.time()
        while self.queue and len(batch) < self.settings.max_batch_size:
            item = self.queue.popleft()
            if item.future.done():  # cancelled while queued
                continue
            if now >= item.deadline:
                self._metrics.expired()
                item.future.set_exception(DeadlineExceeded(
                    f"{self.stage}: the request's deadline passed while it queued"))
                continue
            batch.append(item)
        self._metrics.queue(len(self.queue))
        return batch

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        idle = True
        while not self.unhealthy:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if idle and self.settings.batch_wait_timeout_s > 0 and \
                    len(self.queue) < self.settings.max_batch_size:
                await asyncio.sleep(self.settings.batch_wait_timeout_s)
            batch = self._take()
            if not batch:
                idle = True
                continue
            idle = False
            await self._run(loop, batch)
            idle = not self.queue

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        deadline = max(item.deadline for item in batch)
        start = time.time()
        self.running = (start, deadline, len(batch))
        self.batches += 1
        self.items += len(batch)
        stall, self.stall_next_s = self.stall_next_s, 0.0
        payloads = [item.payload for item in batch]
        future = loop.run_in_executor(self._executor, self._work, payloads, stall)
        try:
            results = await self._outlast(future, batch, start, deadline)
            if results is None:
                return
        except Exception as exc:  # the whole batch failed: each caller gets the error
            log.warning("%s: batch of %d failed: %r", self.stage, len(batch), exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self.running = None
            took = time.time() - start
            self.busy_s += took
            self._metrics.batch(len(batch), took)
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    async def _outlast(self, future: asyncio.Future, batch: list[_Item], start: float,
                       deadline: float) -> Sequence[Any] | None:
        """The batch's results; past its deadline + grace its callers get their timeout, and
        None once it is judged stuck (the batcher then trips)."""
        grace = self._judge.grace_s = self.settings.stall_grace_s
        budget = deadline + grace - time.time()
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), max(budget, 0.0))
            except TimeoutError:
                reason = self.unhealthy or self._judge.stuck(time.time() - deadline - grace)
            for item in batch:
                if not item.future.done():
                    self._metrics.expired()
                    item.future.set_exception(
                        ReplicaUnhealthy(f"{self.stage}: {reason}") if reason else
                        DeadlineExceeded(f"{self.stage}: the request's deadline passed while "
                                         "its batch ran (slow, not stuck)"))
            if reason:
                self._trip(f"{self.stage}: a batch of {len(batch)} ran "
                           f"{time.time() - start:.1f} s, past its requests' deadline + "
                           f"stall_grace_s; {reason}")
                return None
            log.warning("%s: a batch of %d is slow (past its deadline + %.1f s) but computing",
                        self.stage, len(batch), grace)
            budget = grace / 2

    def _work(self, payloads: list[Any], stall_s: float) -> Sequence[Any]:
        self._judge.bind()
        self._judge.started()
        if stall_s:
            time.sleep(stall_s)  # test-only: a thread that hangs like a stuck ray.get
        return self.work(payloads)

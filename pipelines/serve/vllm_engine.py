"""The LLM deployment's engine on vLLM: one ``AsyncLLM`` per replica for both passes.

:class:`VLLMEngine` has the interface of :class:`pipelines.serve.engine.DecodeEngine`
(``stream``, ``check``, ``summary``, ``max_rows``, ``stall_grace_s``), so the LLM deployment
and its guarantees do not depend on the engine:

- A prompt is *mixed* (:func:`pipelines.common.vllm_parts.mixed_prompt`): text as token ids,
  the Adapter's image tokens as embedding rows, so vLLM's prefix cache serves the shared text
  (the routing instructions, the chat template) across requests.
- Settings map one to one (:func:`pipelines.common.vllm_parts.sampling_params`): greedy or
  sampling with its own seed, ``top_p``, stop strings, the turn's end-of-sequence ids; the
  routing reply's constraint becomes a structured-output regex
  (:func:`mova.routing_constraint.routing_regex`).
- Every request carries its deadline: past it the request is aborted in the engine and a
  timeout event ends the stream; a caller that goes away (cancelled, disconnected) aborts it
  too, so no engine step serves a request nobody waits for.
- :meth:`VLLMEngine.check` fails when the engine died, or when :meth:`VLLMEngine.watch` found
  it stuck: requests waited ``stall_grace_s`` with no output while the engine's processes used
  no CPU (:class:`pipelines.serve.progress.StallJudge`), and a one-token probe got no answer
  either. A slow engine (a loaded machine) is never restarted.
- vLLM's statistics (KV-cache use, prefix-cache hits, running and waiting requests, TTFT) feed
  the ``mova_*`` families (:class:`MetricsLogger`).

vLLM is optional and slow to import (~9 s), so only :mod:`pipelines.serve.llm` imports this
module, and only when the recipe picks the vLLM engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psutil
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.metrics.loggers import StatLoggerBase

from mova.decoding import DecodeParams
from mova.text_stream import TextAssembler
from pipelines.common.llm_engine import VLLMRecipe
from pipelines.common.vllm_parts import engine_kwargs, mixed_prompt, sampling_params
from pipelines.serve.engine import Prompt, error_event
from pipelines.serve.errors import ReplicaUnhealthy
from pipelines.serve.metrics import metric, stage_metrics
from pipelines.serve.progress import StallJudge

log = logging.getLogger(__name__)


class MetricsLogger(StatLoggerBase):
    """vLLM's per-step statistics into the ``mova_*`` families."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self._metrics = stage_metrics("decode")
        self._failed = False

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        # vLLM calls this in its output handler: an exception here would stop the engine
        try:
            self._record(scheduler_stats, iteration_stats)
        except Exception as exc:  # metrics must never break serving
            if not self._failed:
                log.warning("vLLM statistics not recorded: %r", exc)
            self._failed = True

    def _record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self._metrics.queue(scheduler_stats.num_waiting_reqs)
            metric("engine_kv_cache_usage").set(scheduler_stats.kv_cache_usage)
            cache = scheduler_stats.prefix_cache_stats
            if cache is not None:
                for result, tokens in (("hit", cache.hits), ("miss", cache.queries - cache.hits)):
                    if tokens > 0:  # a Ray counter takes only increments > 0
                        metric("engine_prefix_cache_tokens").inc(tokens,
                                                                 tags={"result": result})
            if scheduler_stats.num_running_reqs:
                metric("batch_size").observe(scheduler_stats.num_running_reqs,
                                             tags={"stage": "decode"})
        if iteration_stats is not None:
            for ttft in iteration_stats.time_to_first_tokens_iter:
                metric("engine_time_to_first_token_seconds").observe(ttft)

    def log_engine_initialized(self) -> None:
        log.info("vLLM engine ready")


def _children_total(measure: Callable[[psutil.Process], float]) -> float:
    """``measure`` summed over this replica's child processes (vLLM's engine core)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            total += measure(child)
        except psutil.Error:  # exited meanwhile
            continue
    return total


def _engine_cpu_seconds() -> float:
    """CPU seconds used so far by the engine's processes."""
    return _children_total(lambda p: sum(p.cpu_times()[:2]))


def _engine_rss_bytes() -> int:
    """Resident memory of the engine's processes."""
    return int(_children_total(lambda p: p.memory_info().rss))


def _engine_pids() -> list[int]:
    """The engine's processes (a killed replica's must not outlive it)."""
    return sorted(child.pid for child in psutil.Process().children(recursive=True))


_EXPIRED = object()  # _next's answer when a request's deadline passed first


def _resume(process: psutil.Process) -> None:
    try:
        process.send_signal(signal.SIGCONT)
    except psutil.Error:
        pass


class VLLMEngine:
    """Rows of many requests decoded by one vLLM engine (continuous batching, paged KV cache,
    prefix cache)."""

    def __init__(self, folder: str, tokenizer: Any, eos_ids: Sequence[int],
                 image_token_id: int, *,
                 settings: VLLMRecipe | None = None, max_rows: int = 16,
                 stall_grace_s: float = 10.0) -> None:
        start = time.perf_counter()
        settings = settings or VLLMRecipe()
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_kwargs(folder, settings, max_rows)),
            stat_loggers=[MetricsLogger])
        self.dtype = self.engine.model_config.dtype
        self.tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self.image_token_id = image_token_id
        self.max_rows, self.stall_grace_s = max_rows, stall_grace_s
        self.unhealthy: str | None = None
        self.started_s = time.perf_counter() - start
        self.requests = self.aborted = 0
        self._keys = itertools.count()
        self._active: set[str] = set()  # ids of the requests in the engine
        self._progress = time.time()  # the last output of any request
        self._last_sent = 0.0  # when the latest request went to the engine
        self._tripped = asyncio.Event()  # set when the engine is found stuck or dead
        self._probing = False
        self._judge = StallJudge(stall_grace_s, cpu=_engine_cpu_seconds)
        self._metrics = stage_metrics("decode")
        log.info("vLLM engine on %s (%s) started in %.1f s", folder, self.dtype, self.started_s)

    async def stream(self, prompt: Prompt, params: DecodeParams, deadline: float
                     ) -> AsyncIterator[dict[str, Any]]:
        """Decode one row; yields its event dicts, the last one ``done`` or ``error``."""
        self.check()
        if time.time() >= deadline:
            self._metrics.expired()
            yield error_event("the request's deadline passed before decoding", timeout=True)
            return
        try:
            inputs = mixed_prompt(prompt.ids, prompt.image_tokens, self.image_token_id,
                                  self.dtype)
            settings = sampling_params(params, self.eos_ids)
        except ValueError as exc:
            yield error_event(str(exc), bad_request=True)
            return
        rid = f"mova-{next(self._keys)}"
        self._active.add(rid)
        self._last_sent = time.time()
        self.requests += 1
        answered = False  # a request that ends any other way is aborted in the engine
        try:
            async for event in self._events(rid, inputs, params, settings, deadline):
                answered = bool(event.get("done"))
                yield event
        finally:
            self._active.discard(rid)
            if not answered:
                self.aborted += 1
                await self.engine.abort(rid)

    async def _events(self, rid: str, inputs: dict[str, Any], params: DecodeParams,
                      settings: SamplingParams, deadline: float
                      ) -> AsyncIterator[dict[str, Any]]:
        # text from token ids as the torch loop assembles it (stripped, stop strings cut,
        # deltas that never need taking back), so both engines answer alike
        text = TextAssembler(self.tokenizer, params.stop)
        outputs = self.engine.generate(inputs, settings, request_id=rid)
        tripped = asyncio.ensure_future(self._tripped.wait())
        try:
            while True:
                out = await self._next(outputs, tripped, deadline)
                if out is _EXPIRED:  # only the waits are timed, never the caller's work
                    self._metrics.expired()
                    yield error_event("the request's deadline passed during decoding",
                                      timeout=True)
                    return
                if out is None:  # the engine was found stuck or dead meanwhile
                    yield error_event(self.unhealthy or "vLLM engine unhealthy",
                                      unavailable=True)
                    return
                self._progress = time.time()
                piece = out.outputs[0]
                delta = "".join(text.add(t) for t in piece.token_ids)
                if not out.finished:
                    if delta:
                        yield {"delta": delta, "done": False}
                    continue
                final, rest = text.finish()
                yield {"delta": delta + rest, "done": True, "text": final,
                       "finish_reason": piece.finish_reason,
                       "prompt_tokens": len(out.prompt_token_ids or ()),
                       "completion_tokens": len(text.tokens)}
                return
        except EngineDeadError as exc:
            self._trip(f"vLLM engine died: {exc}")
            yield error_event(self.unhealthy or "vLLM engine died", unavailable=True)
        except EngineGenerateError as exc:  # this request failed inside the engine
            log.warning("vLLM failed request %s: %r", rid, exc.__cause__ or exc)
            if self.engine.errored:
                self._trip("vLLM engine died")
            yield error_event(f"the LLM engine failed this request: {exc.__cause__ or exc!r}",
                              unavailable=self.unhealthy is not None)
        except ValueError as exc:  # e.g. a prompt longer than max_model_len
            yield error_event(str(exc), bad_request=True)
        finally:
            tripped.cancel()

    @staticmethod
    async def _next(outputs: AsyncIterator[Any], tripped: asyncio.Future, deadline: float
                    ) -> Any:
        """The engine's next output for a request; None when the engine is found unhealthy
        first (a stuck engine sends nothing: its waiting requests must not wait for it),
        ``_EXPIRED`` when the deadline comes first."""
        step = asyncio.ensure_future(anext(outputs))
        try:
            await asyncio.wait({step, tripped}, timeout=max(0.0, deadline - time.time()),
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller is gone: vLLM aborts the request
            step.cancel()
            raise
        if not step.done():
            step.cancel()
            return None if tripped.done() else _EXPIRED
        return step.result()

    def check(self) -> None:
        """Raise :class:`ReplicaUnhealthy` when the engine died or was found stuck."""
        if self.unhealthy is None and self.engine.errored:
            self._trip("vLLM engine died")
        if self.unhealthy:
            raise ReplicaUnhealthy(self.unhealthy)

    async def watch(self) -> None:
        """Called often by the replica's monitor: when requests have waited ``stall_grace_s``
        with no output from the engine while its processes used no CPU, a one-token probe
        request decides: no answer within ``stall_grace_s`` either, and the engine is stuck
        (the replica turns unhealthy: waiting requests get 503, Serve replaces it)."""
        self.check()
        owed = bool(self._active) or self._last_sent > self._progress
        if not owed or self._probing or time.time() - self._progress < self.stall_grace_s:
            return
        self._judge.grace_s = self.stall_grace_s
        reason = self._judge.stuck(0.0)
        if reason is not None:
            self._probing = True
            asyncio.get_running_loop().create_task(self._probe(reason))

    async def _probe(self, reason: str) -> None:
        rid = f"mova-probe-{next(self._keys)}"
        waited = time.time() - self._progress
        try:
            async with asyncio.timeout(self.stall_grace_s):
                async for _ in self.engine.generate({"prompt_token_ids": self.eos_ids[:1]},
                                                    SamplingParams(max_tokens=1),
                                                    request_id=rid):
                    self._progress = time.time()
                    return
        except TimeoutError:
            self._trip(f"vLLM engine: no output for {waited:.1f} s with requests waiting, "
                       f"and a probe request unanswered for {self.stall_grace_s:.1f} s; "
                       f"{reason}")
        except EngineDeadError:
            self._trip("vLLM engine died")
        finally:
            self._probing = False
            await self.engine.abort(rid)

    def _trip(self, reason: str) -> None:
        self.unhealthy = reason
        self._tripped.set()
        log.error("replica unhealthy: %s", reason)
        self._metrics.unhealthy()

    def summary(self) -> dict[str, Any]:
        return {"engine": "vllm", "requests": self.requests, "aborted": self.aborted,
                "waiting": len(self._active), "queued": 0, "unhealthy": self.unhealthy,
                "started_s": round(self.started_s, 1), "engine_rss_bytes": _engine_rss_bytes(),
                "engine_pids": _engine_pids()}

    def pause(self, seconds: float) -> None:
        """Test-only fault: stop the engine's processes for ``seconds`` (SIGSTOP, SIGCONT)."""
        loop = asyncio.get_running_loop()
        for child in psutil.Process().children(recursive=True):
            child.send_signal(signal.SIGSTOP)
            loop.call_later(seconds, _resume, child)

    def shutdown(self) -> None:
        self.engine.shutdown()


def start_vllm(folder: str, model: Any, config: dict[str, Any]) -> VLLMEngine:
    """The engine of an LLM replica: ``config`` is the app's ``{"kind", "max_rows",
    "stall_grace_s", "vllm": {...}}`` (the recipe's ``llm`` section)."""
    return VLLMEngine(folder, model.tokenizer, model.eos_ids(), model.image_token_id,
                      settings=VLLMRecipe(**config.get("vllm", {})),
                      max_rows=int(config.get("max_rows", 16)),
                      stall_grace_s=float(config.get("stall_grace_s", 10.0)))

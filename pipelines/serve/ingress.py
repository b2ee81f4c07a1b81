"""The HTTP ingress: an OpenAI-compatible API (FastAPI) in front of the MoVA deployments.

Endpoints: ``POST /v1/chat/completions`` (plain or SSE streaming), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` (liveness), ``GET /ready`` (runs the model),
``GET /metrics`` (Prometheus text). Every error is an OpenAI error envelope.
"""

# No `from __future__ import annotations` here: Serve's ingress wrapper re-creates the route
# methods, and FastAPI must see real classes (not strings) to recognise `request: Request`.
import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from mova.config import from_dict
from mova.decoding import DecodeParams
from pipelines.serve import sources
from pipelines.serve.deployments import process_info
from pipelines.serve.errors import APIError, bad_request, install_handlers, overloaded, to_api_error
from pipelines.serve.metrics import ServeMetrics
from pipelines.serve.openai_types import (
    ChatRequest,
    chunk_body,
    completion_body,
    model_card,
    models_body,
    new_id,
    parse_chat_request,
    to_conversation,
    unknown_model,
    usage,
)
from pipelines.serve.pipeline import Pipeline, Prepared, PromptChecker, Vision, check_event, collect
from pipelines.serve.recipe import ServeRecipe

log = logging.getLogger(__name__)

api = FastAPI(title="MoVA", description="OpenAI-compatible MoVA chat completions")
install_handlers(api)


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(api)
class MoVAIngress:
    """Checks requests, drives the pipeline, and speaks the OpenAI wire format."""

    def __init__(self, recipe: dict[str, Any], adapter, llm, experts: dict[str, Any]) -> None:
        self.recipe = from_dict(ServeRecipe, recipe).validate()
        self.checker = PromptChecker(self.recipe.checkpoint, self.recipe)
        self.metrics = ServeMetrics()
        self.pipeline = Pipeline(adapter, llm, experts, self.metrics)
        self.api_key = self.recipe.api_key or os.environ.get(self.recipe.api_key_env) or None
        self.created = int(time.time())
        self.in_flight = 0

    def info(self) -> dict[str, Any]:
        """PID and memory of this replica (a handle method, not an HTTP route)."""
        return {**process_info("Ingress"), "in_flight": self.in_flight}

    # ---- small endpoints ---------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return models_body(self.recipe.model_name, self.created)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        if model_id != self.recipe.model_name:
            raise unknown_model(model_id, self.recipe.model_name)
        return model_card(model_id, self.created)

    @api.get("/ready")
    async def ready(self) -> dict[str, Any]:
        """Readiness: one tiny request through encoder, router, fusion and one answer token
        (experts are not woken: they may be scaled to zero on purpose)."""
        import ray
        from PIL import Image

        start = time.perf_counter()
        image = [ray.put(Image.new("RGB", (64, 64), (128, 128, 128)))]
        prep = Prepared(image=image, questions=["Is the server ready?"],
                        prompt_ids=self._probe_prompt(), forced=None,
                        params=DecodeParams(max_new_tokens=1))
        try:
            async with asyncio.timeout(min(30.0, self.recipe.limits.request_timeout_s)):
                vision = await self.pipeline.vision(prep, skip_experts=True)
                await collect(self.pipeline.answer(prep, vision, stream=False))
        except Exception as exc:
            err = to_api_error(exc, timeout_s=30.0)
            raise APIError(503, f"not ready: {err.message}", type="server_error",
                           code="not_ready") from None
        return {"status": "ready", "latency_ms": round((time.perf_counter() - start) * 1e3, 2)}

    def _probe_prompt(self) -> list[int]:
        from pipelines.serve.openai_types import Conversation

        conv = Conversation(turns=[{"from": "human", "value": "Is the server ready?"}],
                            image_url="", image_param="", questions=["Is the server ready?"])
        return self.checker.prompt_ids(conv, DecodeParams(max_new_tokens=1), route=True)

    # ---- chat completions --------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        start = time.perf_counter()
        status, req, handed_off = 500, None, False
        try:
            self._authorize(request)
            req = parse_chat_request(await self._json(request))
            if req.model != self.recipe.model_name:
                raise unknown_model(req.model, self.recipe.model_name)
            if self.in_flight >= self.recipe.limits.max_inflight:
                raise overloaded(f"{self.in_flight} requests are in flight on this replica "
                                 f"(limit {self.recipe.limits.max_inflight}); retry shortly")
            self.in_flight += 1
            self.metrics.in_flight.inc()
            response: Response | None = None
            try:
                response = await self._complete(req, start)
            finally:
                # a stream releases its slot when it ends (see _sse_events)
                handed_off = isinstance(response, StreamingResponse)
                if not handed_off:
                    self._release()
            status = 200
            return response
        except Exception as exc:
            err = to_api_error(exc, timeout_s=self._timeout(req))
            status = err.status
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        finally:
            self.metrics.requests.labels(status=str(status)).inc()
            if not handed_off:
                self.metrics.latency.observe(time.perf_counter() - start)

    def _release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer "
                           "<key>')", code="invalid_api_key")

    @staticmethod
    async def _json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}",
                              code="invalid_json") from None

    def _timeout(self, req: ChatRequest | None) -> float:
        limit = self.recipe.limits.request_timeout_s
        if req is not None and req.mova is not None and req.mova.timeout_s is not None:
            return min(limit, req.mova.timeout_s)
        return limit

    async def _prepare(self, req: ChatRequest) -> Prepared:
        import ray

        limits = self.recipe.limits
        conv = to_conversation(req.messages, limits.max_images)
        forced = self.checker.forced_experts(req.mova.experts if req.mova else None)
        params = self.checker.decode_params(req)
        if sources.classify(conv.image_url) == "remote" and limits.allow_remote_images:
            data = await sources.fetch_remote(conv.image_url, max_bytes=limits.max_image_bytes,
                                              timeout_s=limits.remote_image_timeout_s)
        else:
            data = await asyncio.to_thread(sources.image_bytes, conv.image_url,
                                           max_bytes=limits.max_image_bytes,
                                           allowed_dirs=limits.allowed_image_dirs)

        def work() -> Prepared:
            ids = self.checker.prompt_ids(conv, params, route=forced is None)
            image = sources.decode_image(data)
            return Prepared(image=[ray.put(image)], questions=conv.questions, prompt_ids=ids,
                            params=params, forced=forced)

        try:
            return await asyncio.to_thread(work)
        except APIError as exc:
            if exc.code in ("invalid_image", "image_too_large"):
                exc.param = conv.image_param
            raise

    async def _complete(self, req: ChatRequest, start: float) -> Response:
        timeout_s = self._timeout(req)
        deadline = asyncio.get_running_loop().time() + timeout_s
        stream = None
        try:
            async with asyncio.timeout_at(deadline):
                prep = await self._prepare(req)
                prepared = time.perf_counter()
                vision = await self.pipeline.vision(prep)
                stream = self.pipeline.answer(prep, vision, stream=req.stream)
                first = check_event(await anext(stream))
                if not req.stream:
                    final = first if first.get("done") else await collect(stream)
        except BaseException:
            if stream is not None:
                stream.cancel()
            raise
        ext = vision.extension(self.checker.pool)
        if not req.stream:
            now = time.perf_counter()
            ext.timings_ms = {k: round(v * 1e3, 2) for k, v in (
                ("prepare", prepared - start), ("vision", vision.seconds),
                ("answer", now - prepared - vision.seconds), ("total", now - start))}
            self._count_tokens(final)
            self.metrics.first_token.observe(time.perf_counter() - start)
            return JSONResponse(completion_body(
                id=new_id(), model=self.recipe.model_name, text=final["text"],
                finish_reason=final["finish_reason"], prompt_tokens=final["prompt_tokens"],
                completion_tokens=final["completion_tokens"], mova=ext))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = self._sse_events(first, stream, vision, deadline, timeout_s, start,
                                include_usage)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _count_tokens(self, final: dict[str, Any]) -> None:
        self.metrics.prompt_tokens.inc(final["prompt_tokens"])
        self.metrics.completion_tokens.inc(final["completion_tokens"])

    async def _sse_events(self, first: dict[str, Any], stream, vision: Vision,
                          deadline: float, timeout_s: float, start: float,
                          include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks: role (with the ``mova`` field), content deltas, the finish reason,
        optionally usage, then ``[DONE]``. A failure mid-stream is sent as an error event
        (then ``[DONE]``), so no client waits on a dead stream."""
        rid, created, model = new_id(), int(time.time()), self.recipe.model_name
        finished = False
        try:
            yield _sse(chunk_body(id=rid, model=model, created=created,
                                  delta={"role": "assistant", "content": ""},
                                  mova=vision.extension(self.checker.pool).model_dump()))
            event, seen_text = first, False
            while True:
                if event["delta"]:
                    if not seen_text:
                        self.metrics.first_token.observe(time.perf_counter() - start)
                        seen_text = True
                    yield _sse(chunk_body(id=rid, model=model, created=created,
                                          delta={"content": event["delta"]}))
                if event["done"]:
                    break
                async with asyncio.timeout_at(deadline):
                    following = await anext(stream, None)
                if following is None:
                    raise RuntimeError("the answer stream ended without a final event")
                event = check_event(following)
            finished = True
            self._count_tokens(event)
            yield _sse(chunk_body(id=rid, model=model, created=created, delta={},
                                  finish_reason=event["finish_reason"]))
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [],
                            "usage": usage(event["prompt_tokens"], event["completion_tokens"])})
            yield _sse("[DONE]")
        except Exception as exc:
            err = to_api_error(exc, timeout_s=timeout_s)
            self.metrics.requests.labels(status=f"stream_{err.status}").inc()
            yield _sse(err.body())
            yield _sse("[DONE]")
        finally:
            if not finished:
                stream.cancel()
            self.metrics.latency.observe(time.perf_counter() - start)
            self._release()

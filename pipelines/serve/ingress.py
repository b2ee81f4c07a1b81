"""The ingress deployment: checks requests, drives the pipeline, speaks the OpenAI wire format.

Each request gets a deadline (``limits.request_timeout_s``, or less with ``mova.timeout_s``)
that every downstream call carries. Its in-flight slot is a ticket that is always given back:
when the reply is sent, when the request fails or its client goes away (also before a stream
starts: the stream's generator is primed while the request still owns the ticket, and
reclaimed when dropped), and, as a last resort, by a sweep of tickets held past their
deadline. A request the replica could not finish within its deadline, by what it measured
lately, is refused at once with a 503 (:mod:`pipelines.serve.admission`), before its body is
read, or within 0.6 s of its arrival when a burst behind it would have had it refused; the
app's other ingress replicas' requests count (:mod:`pipelines.serve.load_board`). The HTTP
routes are in :mod:`pipelines.serve.api`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

from mova.decoding import DecodeParams
from mova.typed_dict import from_dict
from pipelines.serve import remote, sources
from pipelines.serve.admission import Admission, Tickets
from pipelines.serve.api import build_api
from pipelines.serve.deployments import process_info
from pipelines.serve.errors import (
    APIError,
    bad_request,
    overloaded,
    payload_too_large,
    to_api_error,
)
from pipelines.serve.load_board import share_load
from pipelines.serve.metrics import metric, node_metrics_text
from pipelines.serve.openai_request import (
    ChatRequest,
    Conversation,
    parse_chat_request,
    to_conversation,
    unknown_model,
)
from pipelines.serve.openai_response import (
    chunk_body,
    completion_body,
    model_card,
    models_body,
    new_id,
    usage_chunk_body,
)
from pipelines.serve.recipe import ServeRecipe
from pipelines.serve.request_flow import (
    Pipeline,
    Prepared,
    PromptChecker,
    Vision,
    check_event,
    collect,
)

log = logging.getLogger(__name__)
TICKET_GRACE_S = 10.0
REPLY_RESERVE_S, REPLY_RESERVE_SHARE = 0.5, 0.1


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def proxy_bind_host() -> str | None:
    """The host Serve's HTTP proxies bind (None if the controller cannot tell in time)."""
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        config = await asyncio.wait_for(controller.get_http_config.remote(), timeout=10)
        return config.host
    except Exception as exc:  # never block start-up on it: the recipe's host is the fallback
        log.warning("could not read Serve's HTTP options: %r", exc)
        return None


@serve.deployment(name="Ingress")
@serve.ingress()
class MoVAIngress:
    """The OpenAI-compatible front of the app (one FastAPI app per replica)."""

    async def __init__(self, recipe: dict[str, Any], adapter, llm,
                       experts: dict[str, Any]) -> None:
        self.recipe = from_dict(ServeRecipe, recipe).validate()
        self.api_key = self.recipe.resolve_api_key()
        self.recipe.check_exposure(await proxy_bind_host())
        self.public_health = self.recipe.public_health
        self.max_body_bytes = self.recipe.limits.max_body_bytes
        self.checker = await asyncio.to_thread(PromptChecker, self.recipe.checkpoint,
                                               self.recipe)
        self.pipeline = Pipeline(adapter, llm, experts, self.checker.caches)
        self.created = int(time.time())
        self.tickets = Tickets(Admission(
            cold_min_budget_s=self.recipe.limits.request_timeout_s / 2))
        context = serve.get_replica_context()
        self._sharing = asyncio.create_task(share_load(
            self.tickets, context.app_name, context.replica_id.unique_id))

    def __serve_build_asgi_app__(self):
        return build_api(self)

    async def check_health(self) -> None:
        self.tickets.sweep()

    def __del__(self) -> None:
        """Serve stops this replica (scaled down or redeployed): say so, with what it held."""
        tickets = getattr(self, "tickets", None)
        if tickets is not None:
            log.warning("Ingress replica stopping (scaled down or redeployed) with %d "
                        "request(s) in flight", len(tickets))

    def info(self) -> dict[str, Any]:
        """PID, memory and in-flight count of this replica (a handle method, not a route)."""
        data = process_info("Ingress")
        metric("resident_memory_bytes").set(data["rss_bytes"])
        caches = {name: c.summary() for name, c in self.checker.caches.items()}
        return {**data, "in_flight": len(self.tickets), "peers_in_flight": self.tickets.others,
                "feature_cache": caches}

    # ---- small routes -------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return models_body(self.recipe.model_name, self.created)

    def model(self, model_id: str) -> dict[str, Any]:
        if model_id != self.recipe.model_name:
            raise unknown_model(model_id, self.recipe.model_name)
        return model_card(model_id, self.created)

    def served(self) -> dict[str, Any]:
        """The model name and expert pool requests may name (stated in the OpenAPI schema)."""
        return {"model": self.recipe.model_name, "experts": list(self.checker.pool)}

    def limits(self) -> dict[str, Any]:
        lim = self.recipe.limits
        return {"max_images": lim.max_images, "max_image_bytes": lim.max_image_bytes,
                "max_image_side": self.checker.max_image_side,
                "max_body_bytes": lim.max_body_bytes, "max_prompt_chars": lim.max_prompt_chars,
                "max_tokens": lim.max_tokens, "max_inflight_per_replica": lim.max_inflight,
                "request_timeout_s": lim.request_timeout_s, "max_stop": 4,
                "remote_images": lim.allow_remote_images,
                "context_tokens": self.checker.config.llm.max_position_embeddings}

    async def metrics_text(self) -> str:
        try:
            return await node_metrics_text()
        except Exception as exc:
            log.warning("metrics unavailable: %r", exc)
            return ""

    async def ready(self) -> dict[str, Any]:
        """One tiny request through encoder, router, fusion and one answer token (experts
        are not woken: they may be scaled to zero on purpose)."""
        start = time.perf_counter()
        timeout_s = min(30.0, self.recipe.limits.request_timeout_s)
        conv = Conversation(turns=[{"from": "human", "value": "Is the server ready?"}],
                            image_url="", image_param="", questions=["Is the server ready?"])
        params = DecodeParams(max_new_tokens=1)
        prep = Prepared(image=Image.new("RGB", (64, 64), (128, 128, 128)),
                        questions=conv.questions, forced=None, params=params,
                        prompt_ids=self.checker.prompt_ids(conv, params, route=True),
                        deadline=time.time() + timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                vision = await self.pipeline.vision(prep, skip_experts=True)
                await collect(self.pipeline.answer(prep, vision, stream=False))
        except Exception as exc:
            err = to_api_error(exc, timeout_s=timeout_s)
            raise APIError(503, f"not ready: {err.message}", type="server_error",
                           code="not_ready", headers={"Retry-After": "2"}) from None
        return {"status": "ready", "latency_ms": round((time.perf_counter() - start) * 1e3, 2)}

    # ---- chat completions ------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        start = time.perf_counter()
        status, req, ticket, handed_off = "500", None, None, False
        self.tickets.sweep()
        try:
            # before the body is read (a refused request costs no memory), and again with the
            # request's own deadline (others may have taken slots while its body arrived)
            self._admit(self.recipe.limits.request_timeout_s)
            req = parse_chat_request(await self._json(request))
            if req.model != self.recipe.model_name:
                raise unknown_model(req.model, self.recipe.model_name)
            timeout_s = self._timeout(req)
            self._admit(timeout_s)
            deadline = time.time() + timeout_s - reply_reserve_s(timeout_s)
            ticket = self.tickets.take(deadline + TICKET_GRACE_S)
            response = await self._complete(req, start, deadline, timeout_s, ticket)
            handed_off = isinstance(response, StreamingResponse)
            status = "200"
            return response
        except asyncio.CancelledError:  # the client went away: everything below is cancelled
            status = "499"
            raise
        except Exception as exc:
            err = to_api_error(exc, timeout_s=self._timeout(req))
            status = str(err.status)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        finally:
            if ticket is not None and not handed_off:
                self.tickets.give_back(ticket, answered=status == "200")
            metric("requests").inc(tags={"status": status})
            if not handed_off:
                metric("request_seconds").observe(time.perf_counter() - start)

    def _admit(self, budget_s: float) -> None:
        """A 503 at once for a request this replica cannot take now or finish within
        ``budget_s`` (:class:`~pipelines.serve.admission.Admission`)."""
        if len(self.tickets) >= self.recipe.limits.max_inflight:
            raise overloaded(f"{len(self.tickets)} requests are in flight on this replica "
                             f"(limit {self.recipe.limits.max_inflight}); retry shortly")
        if not self.recipe.limits.admission:
            return
        refusal = self.tickets.admission.refusal(self.tickets.load(), budget_s)
        if refusal is not None:
            raise refusal

    async def _json(self, request: Request) -> Any:
        limit, chunks, size = self.max_body_bytes, [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise payload_too_large(limit)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}",
                              code="invalid_json") from None
        except RecursionError:
            raise bad_request("the request body nests JSON too deeply",
                              code="invalid_json") from None

    def _timeout(self, req: ChatRequest | None) -> float:
        limit = self.recipe.limits.request_timeout_s
        if req is not None and req.mova is not None and req.mova.timeout_s is not None:
            return min(limit, req.mova.timeout_s)
        return limit

    async def _prepare(self, req: ChatRequest, deadline: float) -> Prepared:
        limits = self.recipe.limits
        conv = to_conversation(req.messages, limits.max_images)
        forced = self.checker.forced_experts(req.mova.experts if req.mova else None)
        params = self.checker.decode_params(req)
        try:
            if sources.classify(conv.image_url) == "remote" and limits.allow_remote_images:
                data = await remote.fetch_remote(
                    conv.image_url, domains=limits.remote_image_domains,
                    max_bytes=limits.max_image_bytes,
                    timeout_s=max(0.1, min(limits.remote_image_timeout_s,
                                           deadline - time.time())),
                    max_redirects=limits.remote_image_max_redirects)
            else:
                data = await asyncio.to_thread(sources.image_bytes, conv.image_url,
                                               max_bytes=limits.max_image_bytes,
                                               allowed_dirs=limits.allowed_image_dirs)

            def work() -> Prepared:
                ids = self.checker.prompt_ids(conv, params, route=forced is None)
                image = sources.decode_image(data, self.checker.max_image_side)
                return Prepared(image=image, questions=conv.questions, prompt_ids=ids,
                                params=params, forced=forced, deadline=deadline,
                                debug=bool(req.mova and req.mova.debug),
                                image_hash=self.checker.image_key(data))

            return await asyncio.to_thread(work)
        except APIError as exc:
            if exc.code and "image" in exc.code and exc.param is None:
                exc.param = conv.image_param
            raise

    async def _begin(self, req: ChatRequest, deadline: float) -> tuple[
            Prepared, float, Vision, Any, dict[str, Any], dict[str, Any] | None]:
        """Up to the answer's first event (the whole answer unless streamed), by ``deadline``:
        the request, when its inputs were prepared, its vision, the answer's stream, its first
        event and, unless streamed, its final one."""
        stream, final = None, None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                prep = await self._prepare(req, deadline)
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
        return prep, prepared, vision, stream, first, final

    async def _complete(self, req: ChatRequest, start: float, deadline: float,
                        timeout_s: float, ticket: int) -> Response:
        work = asyncio.ensure_future(self._begin(req, deadline))
        # admitted, but a burst behind it may yet make it late: checked again (a 503 then)
        _, prepared, vision, stream, first, final = await (
            self.tickets.first_or_refusal(work, ticket, start, timeout_s)
            if self.recipe.limits.admission else work)
        ext = vision.extension(self.checker.pool)
        if not req.stream:
            now = time.perf_counter()
            ext.timings_ms = {k: round(v * 1e3, 2) for k, v in (
                ("prepare", prepared - start), ("vision", vision.seconds),
                ("answer", now - prepared - vision.seconds), ("total", now - start))}
            self._count_tokens(final)
            metric("time_to_first_token_seconds").observe(now - start)
            return JSONResponse(completion_body(
                id=new_id(), model=self.recipe.model_name, text=final["text"],
                finish_reason=final["finish_reason"], prompt_tokens=final["prompt_tokens"],
                completion_tokens=final["completion_tokens"], mova=ext))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = self._sse_events(first, stream, vision, deadline, timeout_s, start,
                                  include_usage, ticket)
        opening = await anext(events)  # primed: from here on the generator owns the ticket
        return StreamingResponse(_chain(opening, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _count_tokens(self, final: dict[str, Any]) -> None:
        metric("prompt_tokens").inc(final["prompt_tokens"])
        metric("completion_tokens").inc(final["completion_tokens"])

    async def _sse_events(self, first: dict[str, Any], stream, vision: Vision,
                          deadline: float, timeout_s: float, start: float,
                          include_usage: bool, ticket: int) -> AsyncIterator[str]:
        """SSE chunks: role (with the ``mova`` field), content deltas, the finish reason,
        optionally usage, then ``[DONE]``. A failure mid-stream is sent as an error event
        (then ``[DONE]``), so no client waits on a dead stream."""
        rid, created, model = new_id(), int(time.time()), self.recipe.model_name
        finished = False
        try:
            yield _sse(chunk_body(id=rid, model=model, created=created,
                                  delta={"role": "assistant", "content": ""},
                                  mova=vision.extension(self.checker.pool)))
            event, seen_text = first, False
            while True:
                if event["delta"]:
                    if not seen_text:
                        metric("time_to_first_token_seconds").observe(
                            time.perf_counter() - start)
                        seen_text = True
                    yield _sse(chunk_body(id=rid, model=model, created=created,
                                          delta={"content": event["delta"]}))
                if event["done"]:
                    break
                async with asyncio.timeout(max(0.0, deadline - time.time())):
                    following = await anext(stream, None)
                if following is None:
                    raise RuntimeError("the answer stream ended without a final event")
                event = check_event(following)
            finished = True
            self._count_tokens(event)
            yield _sse(chunk_body(id=rid, model=model, created=created, delta={},
                                  finish_reason=event["finish_reason"]))
            if include_usage:
                yield _sse(usage_chunk_body(id=rid, model=model, created=created,
                                            prompt_tokens=event["prompt_tokens"],
                                            completion_tokens=event["completion_tokens"]))
            yield _sse("[DONE]")
        except Exception as exc:
            err = to_api_error(exc, timeout_s=timeout_s)
            metric("requests").inc(tags={"status": f"stream_{err.status}"})
            yield _sse(err.body())
            yield _sse("[DONE]")
        finally:
            if not finished:
                stream.cancel()
            metric("request_seconds").observe(time.perf_counter() - start)
            self.tickets.give_back(ticket, answered=finished)


def reply_reserve_s(timeout_s: float) -> float:
    """The part of a request's deadline kept for its reply to reach the client (through the
    HTTP proxy, on a loaded machine): the model work must end this much earlier."""
    return min(REPLY_RESERVE_S, REPLY_RESERVE_SHARE * timeout_s)


async def _chain(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for chunk in rest:
        yield chunk

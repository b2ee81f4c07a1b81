"""The HTTP surface: a FastAPI app built per ingress replica around its :class:`ChatService`.

Endpoints: ``POST /v1/chat/completions`` (plain or SSE streaming), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` (liveness), ``GET /ready`` (runs the model),
``GET /metrics`` (Prometheus text), ``GET /openapi.json`` (the contract). With an API key every
route needs it (``public_health: true`` leaves ``/health`` open); a body over
``limits.max_body_bytes`` is a 413 before it is read; other methods are a 405 with ``Allow``.
Every error is an OpenAI error envelope.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from pipelines.serve.errors import APIError, install_handlers, length_required, payload_too_large
from pipelines.serve.openai_response import Health, ModelCard, ModelList, Ready
from pipelines.serve.openapi import add_components, chat_responses, errors, request_body


class ChatService(Protocol):
    """What the routes need from the ingress replica."""

    api_key: str | None
    public_health: bool
    max_body_bytes: int

    async def chat(self, request: Request) -> Response: ...
    async def ready(self) -> dict[str, Any]: ...
    async def metrics_text(self) -> str: ...
    def models(self) -> dict[str, Any]: ...
    def model(self, model_id: str) -> dict[str, Any]: ...
    def limits(self) -> dict[str, Any]: ...


class Guard:
    """ASGI middleware: the API key on every route, and the body size from its header (a
    body without one, chunked, is refused with 411 before any of it is read)."""

    def __init__(self, app, service: ChatService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        error = self._check(scope, headers)
        if error is not None:
            response = JSONResponse(error.body(), status_code=error.status,
                                    headers=error.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope, headers: dict[str, str]) -> APIError | None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.service.max_body_bytes:
            return payload_too_large(self.service.max_body_bytes)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            # Serve's replica pulls a request's whole body from the proxy as it arrives,
            # whether the app reads it or not: a body must declare its size up front
            return length_required()
        key = self.service.api_key
        if not key:
            return None
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if self.service.public_health and path == "/health":
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              key.encode()):
            return None
        return APIError(401, "incorrect or missing API key (send 'Authorization: Bearer <key>')",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def build_api(service: ChatService) -> FastAPI:
    """The FastAPI app of one ingress replica."""
    auth = bool(service.api_key)
    common = (401, 405, 411, 413) if auth else (405, 411, 413)
    health_common = (405, 411, 413) if service.public_health or not auth else common
    app = FastAPI(title="MoVA", version="1",
                  description="OpenAI-compatible chat completions by a MoVA model (routed vision "
                              "experts + MoV-Adapter). Limits: see info.x-mova-limits.",
                  docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_middleware(Guard, service=service)

    @app.get("/health", response_model=Health, responses=errors(*health_common),
             openapi_extra={"security": []} if service.public_health else None)
    async def health() -> dict[str, str]:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/ready", response_model=Ready, responses=errors(*common, 503))
    async def ready() -> dict[str, Any]:
        """Readiness: one tiny request through encoder, router, fusion and one answer token."""
        return await service.ready()

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text"}, **errors(*common)})
    async def metrics() -> Response:
        """The ``mova_*`` metric families (see pipelines/serve/metrics.py)."""
        return Response(await service.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=errors(*common))
    async def models() -> dict[str, Any]:
        return service.models()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses=errors(*common, 404))
    async def model(model_id: str) -> dict[str, Any]:
        return service.model(model_id)

    @app.post("/v1/chat/completions", responses=chat_responses(auth),
              openapi_extra=request_body(), response_class=JSONResponse)
    async def chat(request: Request) -> Response:
        """A chat completion. Limits (see info.x-mova-limits): one image per request, width
        and height from its header, body size, prompt length, max_tokens, in-flight
        requests per replica, and a deadline per request."""
        return await service.chat(request)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            if auth:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = add_components(schema, service.limits(), **service.served())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

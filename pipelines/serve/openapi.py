"""The OpenAPI document of the server: ``GET /openapi.json`` publishes what the server really
does: the request model, every response model (the streamed ``chat.completion.chunk``
included), every status each route answers with the error envelope, and the limits the server
enforces (``info.x-mova-limits`` and the route descriptions).
"""

from __future__ import annotations

from typing import Any

from pipelines.serve.openai_request import ChatRequest
from pipelines.serve.openai_response import ChatCompletion, ChatCompletionChunk, ErrorResponse

_WHY = {400: "bad input (the message and param name it)", 401: "missing or wrong API key",
        404: "unknown route or model", 405: "method not allowed (see the Allow header)",
        408: "the request's deadline passed", 411: "a body without Content-Length (chunked)",
        413: "the body is over the size limit",
        503: "overloaded, or a model replica is unavailable (see Retry-After)"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` entries: the error envelope for each status."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _WHY[status]}
        if status in (503,):
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                "description": "seconds to wait"}}
        if status == 405:
            entry["headers"] = {"Allow": {"schema": {"type": "string"},
                                          "description": "the methods this route answers"}}
        out[status] = entry
    return out


def chat_responses(auth: bool) -> dict[int | str, dict[str, Any]]:
    """The responses of ``POST /v1/chat/completions``."""
    out: dict[int | str, dict[str, Any]] = {200: {
        "model": ChatCompletion,
        "description": "the reply (JSON), or with stream: true an SSE stream of "
                       "chat.completion.chunk events ending in [DONE]",
        "content": {"text/event-stream": {"schema": sse_event_schema()}}}}
    codes = (400, 401, 404, 405, 408, 411, 413, 503) if auth else \
        (400, 404, 405, 408, 411, 413, 503)
    out.update(errors(*codes))
    return out


def sse_event_schema() -> dict[str, Any]:
    """One server-sent event of a streamed reply: its ``data`` is the JSON of a
    ``ChatCompletionChunk`` (or, after a failure, of an ``ErrorResponse``), the last one
    ``[DONE]``."""
    chunk, error = "#/components/schemas/ChatCompletionChunk", "#/components/schemas/ErrorResponse"
    json_event = {"type": "string", "contentMediaType": "application/json",
                  "contentSchema": {"anyOf": [{"$ref": chunk}, {"$ref": error}]}}
    return {"type": "object", "required": ["data"], "properties": {
        "data": {"anyOf": [{"const": "[DONE]"}, json_event],
                 "description": "a ChatCompletionChunk, an ErrorResponse, or [DONE]"},
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def request_body() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatRequest"}}}}}


def add_components(schema: dict[str, Any], limits: dict[str, Any], model: str,
                   experts: list[str]) -> dict[str, Any]:
    """Add the request and chunk models (not reachable from FastAPI's own walk, since the
    chat route reads and caps its body itself), the rules of this server that JSON Schema
    can state (the served model, the expert pool, the limits on max_tokens and stop) and the
    limits to a generated document."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model_type in (ChatRequest, ChatCompletionChunk):
        generated = model_type.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in generated.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model_type.__name__] = generated
    _state_rules(components, limits, model, experts)
    schema["info"]["x-mova-limits"] = limits
    return schema


def _state_rules(components: dict[str, Any], limits: dict[str, Any], model: str,
                 experts: list[str]) -> None:
    fields = components["ChatRequest"]["properties"]
    fields["model"]["enum"] = [model]
    for name in ("max_tokens", "max_completion_tokens"):
        for branch in fields[name].get("anyOf", [fields[name]]):
            if branch.get("type") == "integer":
                branch["maximum"] = limits["max_tokens"]
    for branch in fields["stop"].get("anyOf", []):
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch.update(minItems=1, maxItems=limits["max_stop"])
            branch["items"]["minLength"] = 1
    options = components["MoVAOptions"]["properties"]["experts"]
    for branch in options.get("anyOf", []):
        if branch.get("type") == "array":
            branch["items"]["enum"] = list(experts)

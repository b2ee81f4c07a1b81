"""The response side of the OpenAI chat-completions API: one pydantic model per body, and the
builders the ingress answers with (each body is built through its model, so the published
schema and what the server sends cannot drift apart)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipelines.common.wire import MoVAInfo

_OPEN = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    model_config = _OPEN
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, whatever its status: OpenAI's envelope."""

    model_config = _OPEN
    error: ErrorBody


class Usage(BaseModel):
    model_config = _OPEN
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    model_config = _OPEN
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    model_config = _OPEN
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    model_config = _OPEN
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    mova: MoVAInfo


class Delta(BaseModel):
    model_config = _OPEN
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    model_config = _OPEN
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed reply (``stream: true``); the stream ends with
    ``data: [DONE]``. The first chunk carries ``mova``; with ``stream_options.include_usage``
    the last one carries ``usage`` and no choices. A failure after the stream started is sent
    as one ``data:`` error envelope, then ``[DONE]``."""

    model_config = _OPEN
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    mova: MoVAInfo | None = None
    usage: Usage | None = None


class ModelCard(BaseModel):
    model_config = _OPEN
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    model_config = _OPEN
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    model_config = _OPEN
    status: Literal["ok"]


class Ready(BaseModel):
    model_config = _OPEN
    status: Literal["ready"]
    latency_ms: float


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _body(model: BaseModel) -> dict[str, Any]:
    """A response model as the JSON object sent (fields left at their default omitted)."""
    return model.model_dump(mode="json", exclude_unset=True)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def completion_body(*, id: str, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int,
                    mova: MoVAInfo) -> dict[str, Any]:
    return _body(ChatCompletion(
        id=id, object="chat.completion", created=int(time.time()), model=model,
        choices=[Choice(index=0, message=AssistantMessage(role="assistant", content=text),
                        finish_reason=finish_reason, logprobs=None)],
        usage=usage(prompt_tokens, completion_tokens), mova=mova))


def chunk_body(*, id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, mova: MoVAInfo | None = None
               ) -> dict[str, Any]:
    """One streamed chunk; the first one carries ``mova``."""
    extra = {} if mova is None else {"mova": mova}
    return _body(ChatCompletionChunk(
        id=id, object="chat.completion.chunk", created=created, model=model,
        choices=[ChunkChoice(index=0, delta=Delta(**delta), finish_reason=finish_reason,
                             logprobs=None)], **extra))


def usage_chunk_body(*, id: str, model: str, created: int, prompt_tokens: int,
                     completion_tokens: int) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``: usage and no choices."""
    return _body(ChatCompletionChunk(id=id, object="chat.completion.chunk", created=created,
                                     model=model, choices=[],
                                     usage=usage(prompt_tokens, completion_tokens)))


def model_card(model: str, created: int) -> dict[str, Any]:
    return _body(ModelCard(id=model, object="model", created=created, owned_by="mova"))


def models_body(model: str, created: int) -> dict[str, Any]:
    return _body(ModelList(object="list", data=[ModelCard(id=model, object="model",
                                                          created=created, owned_by="mova")]))

"""The request side of the OpenAI chat-completions API: strict parsing into MoVA turns.

Requests are checked here, before any model work, so every bad field is a 400 naming it. The
MoVA extension travels in a ``mova`` field: in a request ``{"experts": [...]}`` forces the
routing (``[]`` forces none) and ``timeout_s`` shortens the deadline; in a response it holds
the routing decision and the gate weights (:mod:`pipelines.common.wire`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from pipelines.serve.errors import APIError, bad_request

_STRICT = ConfigDict(strict=True, extra="forbid")
MAX_STOP = 4
# Fields OpenAI clients may send that this server cannot honour unless left at their default
# (a 400 naming the field otherwise). Any other unknown field is a 400 too.
_UNSUPPORTED: dict[str, Any] = {
    "n": 1, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
    "functions": None, "function_call": None, "response_format": None, "logit_bias": None,
    "presence_penalty": 0, "frequency_penalty": 0, "audio": None, "modalities": None,
    "prediction": None, "parallel_tool_calls": None, "reasoning_effort": None,
    "web_search_options": None,
}
# Accepted and ignored (bookkeeping fields of the OpenAI API).
_IGNORED = ("store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")
_DEFAULT_ONLY = "Accepted for compatibility; only its default value is supported."


# JSON Schema of an image's URL: a custom format (a fuzzer or client generator can be told
# how to make one) naming what the server reads.
IMAGE_URL_FORMAT = "image-url"
_IMAGE_URL = {"format": IMAGE_URL_FORMAT,
              "description": "a data: URL of a base64 image (PNG, JPEG, WebP: what Pillow "
                             "reads), or (where the server allows remote images) an https:// "
                             "URL on one of its allowed hosts"}


def _integral(value: Any) -> Any:
    """JSON Schema's integers include ``2.0``; strict parsing would refuse it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
PositiveInteger = Annotated[int, Field(ge=1), BeforeValidator(_integral)]


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(json_schema_extra=_IMAGE_URL)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL | Annotated[str, Field(json_schema_extra=_IMAGE_URL)]


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]
    name: str | None = None
    refusal: None = Field(default=None, description="Accepted (as null) in assistant "
                                                    "messages replayed from a response.")


# JSON Schema for "a user message holds an image_url part and the question" (a 400 without
# an image; the question, of the last user message, is what routing reads).
_USER_IMAGE_MESSAGE = {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"const": "user"},
                   "content": {"type": "array", "allOf": [
                       {"contains": {"type": "object", "required": ["type"],
                                     "properties": {"type": {"const": "image_url"}}}},
                       {"contains": {"type": "object", "required": ["type", "text"],
                                     "properties": {"type": {"const": "text"},
                                                    "text": {"pattern": "[^\\s]"}}}}]}}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class MoVAOptions(BaseModel):
    model_config = _STRICT
    experts: list[str] | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    debug: bool = Field(default=False, description="also return each adapter block's raw "
                                                   "router logits and top-k picks")


class ChatRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (OpenAI's, with MoVA's ``mova`` field).
    Fields not listed are refused with a 400."""

    model_config = ConfigDict(strict=True, extra="allow",
                              json_schema_extra={"additionalProperties": False})
    model: str
    messages: list[Message] = Field(
        min_length=1, json_schema_extra={"contains": _USER_IMAGE_MESSAGE},
        description="An optional first system (or developer) message, then user and "
                    "assistant messages alternating, ending with a user message; one user "
                    "message holds the request's image (an image_url part) and a question "
                    "(a text part); the last user message's text is the question routed.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: PositiveInteger | None = None
    max_completion_tokens: PositiveInteger | None = None
    stop: str | list[str] | None = None
    seed: Integer | None = None
    user: str | None = None
    mova: MoVAOptions | None = None
    n: Literal[1] | None = Field(default=None, description=_DEFAULT_ONLY)
    logprobs: Literal[False] | None = Field(default=None, description=_DEFAULT_ONLY)
    presence_penalty: Literal[0] | None = Field(default=None, description=_DEFAULT_ONLY)
    frequency_penalty: Literal[0] | None = Field(default=None, description=_DEFAULT_ONLY)
    store: bool | None = Field(default=None, description="Ignored.")
    metadata: dict[str, str] | None = Field(default=None, description="Ignored.")


@dataclass
class Conversation:
    """A request's messages as MoVA turns plus its one image source."""

    turns: list[dict[str, str]]
    image_url: str
    image_param: str
    questions: list[str] = field(default_factory=list)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as exc:
        # of a union's failed branches the deepest names the problem ("content.1.image_url.x:
        # extra inputs" rather than "content: not a string")
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = field_path(first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"],
                          param=param) from None
    extra = dict(req.model_extra or {})
    for name in ("n", "logprobs", "presence_penalty", "frequency_penalty"):
        extra[name] = getattr(req, name)
    for name, default in _UNSUPPORTED.items():
        value = extra.pop(name, default)
        if value is not None and value != default:
            raise bad_request(f"{name}={value!r} is not supported by this server",
                              param=name, code="unsupported_parameter")
    unknown = sorted(set(extra) - set(_IGNORED))
    if unknown:
        raise bad_request(f"unrecognized request argument supplied: {unknown[0]}",
                          param=unknown[0], code="unknown_parameter")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree", param="max_tokens")
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise bad_request(f"stop must hold 1 to {MAX_STOP} non-empty strings", param="stop")
    return req


_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


def field_path(loc: tuple) -> str:
    """A validation error's location as a request field path: pydantic's union-branch labels
    (``str``, ``ImageURL``, ``list[tagged-union[...]]`` and the tag after its index) left out."""
    parts: list[str] = []
    drop_tag = False
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif "[" in part or part in _TYPE_LABELS or part[:1].isupper():
            drop_tag = drop_tag or "tagged-union" in part
        elif drop_tag and parts and parts[-1].isdigit():
            drop_tag = False  # the discriminator's value, after the list index
        else:
            parts.append(part)
    return ".".join(parts)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_roles(messages: list[Message]) -> None:
    """A 400 in OpenAI's role names unless the messages are: an optional first ``system``
    (or ``developer``) message, then ``user`` and ``assistant`` alternating, ending with
    ``user`` (what the chat templates can render)."""
    start = 1 if messages[0].role in ("system", "developer") else 0
    if start == len(messages):
        raise bad_request("the messages hold only a system message; a user message must follow",
                          param="messages")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        role = messages[i].role
        if role != expected:
            where = (" (a system or developer message may only come first)"
                     if role in ("system", "developer") else "")
            raise bad_request(f"messages[{i}]: expected a {expected!r} message, got {role!r}"
                              f"{where}; after an optional first system message, user and "
                              "assistant messages alternate", param=f"messages.{i}.role")
    if messages[-1].role != "user":
        raise bad_request("the last message must be a user message", param="messages")


def to_conversation(messages: list[Message], max_images: int) -> Conversation:
    """OpenAI messages -> LLaVA-style turns (image placeholder added later) and the image."""
    check_roles(messages)
    turns: list[dict[str, str]] = []
    images: list[tuple[str, str]] = []
    roles = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}
    for i, msg in enumerate(messages):
        texts: list[str] = []
        if isinstance(msg.content, str):
            texts.append(msg.content)
        else:
            for j, part in enumerate(msg.content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    continue
                if msg.role != "user":
                    raise bad_request(f"messages[{i}]: images are allowed in user messages "
                                      f"only, not in a {msg.role!r} message",
                                      param=f"messages.{i}.content.{j}")
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append((url, f"messages.{i}.content.{j}.image_url"))
        turns.append({"from": roles[msg.role], "value": "\n".join(t for t in texts if t)})
    if len(images) > max_images:
        raise bad_request(f"the messages hold {len(images)} images; at most {max_images} "
                          "allowed", param="messages", code="too_many_images")
    if not images:
        raise bad_request("the messages hold no image_url part; a MoVA request needs one image",
                          param="messages", code="missing_image")
    url, param = images[0]
    questions = [t["value"] for t in turns if t["from"] == "human"]
    return Conversation(turns=turns, image_url=url, image_param=param, questions=questions)



def unknown_model(name: str, served: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                    param="model", code="model_not_found")

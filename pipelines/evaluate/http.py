"""The HTTP side of `mova eval`: ask a running OpenAI-compatible MoVA endpoint, in parallel.

Each question is one ``POST {endpoint}/v1/chat/completions`` (greedy: temperature 0) with the
image as a base64 data URI; forced or labelled routing travels in the ``mova`` extension
field, and the routing decision comes back in the response's ``mova`` field. Requests go
through the official ``openai`` client, which retries overload answers (408/409/429/5xx) and
dropped connections after ``Retry-After`` (or its own back-off), up to ``max_retries`` times.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
from PIL import Image
from pydantic import ValidationError

from mova.images import ImageError, load_image
from mova.tokenizers import IMAGE_TOKEN
from pipelines.common import storage
from pipelines.common.wire import MoVAInfo

log = logging.getLogger(__name__)

_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
_PLACEHOLDER = re.compile(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*")


def openai_client(endpoint: str, api_key: str | None, *, timeout_s: float = 10.0,
                  max_retries: int = 0, concurrency: int = 8,
                  http_client: httpx.Client | None = None) -> openai.OpenAI:
    """The official client for ``{endpoint}/v1``, sized for ``concurrency`` requests."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return openai.OpenAI(base_url=endpoint.rstrip("/") + "/v1", api_key=api_key or "none",
                         timeout=timeout_s, max_retries=max_retries,
                         http_client=http_client or openai.DefaultHttpxClient(limits=limits))


def check_endpoint(endpoint: str, api_key: str | None, timeout_s: float = 10.0) -> None:
    """Fail early, naming the endpoint, when it does not answer ``GET /v1/models``."""
    with openai_client(endpoint, api_key, timeout_s=timeout_s) as client:
        try:
            client.models.list()
        except openai.APIConnectionError as exc:
            raise ValueError(f"endpoint {endpoint} cannot be reached ({client.base_url}"
                             f"models): {exc.__cause__ or exc}") from exc
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ValueError(f"endpoint {endpoint} refused the API key (HTTP "
                             f"{exc.status_code}); set api_key or the api_key_env variable"
                             ) from exc
        except openai.APIStatusError as exc:
            raise ValueError(f"endpoint {endpoint}: GET /v1/models answered HTTP "
                             f"{exc.status_code}; is it a MoVA (OpenAI-compatible) server?"
                             ) from exc


def image_data_uri(data: bytes) -> str:
    """A data URI of the original file bytes (checked to decode, as the server will)."""
    load_image(data)
    with Image.open(io.BytesIO(data)) as image:
        kind = (image.format or "png").lower()
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def to_messages(turns: Sequence[dict], image_uri: str) -> list[dict[str, Any]]:
    """LLaVA turns -> OpenAI messages; the image goes with the turn that held ``<image>`` (else
    the first user turn) and the placeholder is dropped (the server puts it back)."""
    holder = next((i for i, t in enumerate(turns) if IMAGE_TOKEN in t["value"]),
                  next(i for i, t in enumerate(turns) if t["from"] == "human"))
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        text = _PLACEHOLDER.sub(" ", turn["value"]).strip() if i == holder else turn["value"]
        if i == holder:
            content: Any = [{"type": "text", "text": text},
                            {"type": "image_url", "image_url": {"url": image_uri}}]
        else:
            content = text
        messages.append({"role": _ROLES[turn["from"]], "content": content})
    return messages


def _failure(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or exc.response.text[:200]
        return f"HTTP {exc.status_code}: {message}"
    return f"{type(exc).__name__}: {exc.__cause__ or exc}"


def ask_endpoint(client: openai.OpenAI, *, model: str, image: str, turns: Sequence[dict],
                 experts: list[str] | None, max_new_tokens: int) -> dict[str, Any]:
    """One question -> ``{prediction, experts, routing_reply, forced, error, pool}``."""
    try:
        uri = image_data_uri(storage.read_bytes(image))
    except (ImageError, OSError, ValueError) as exc:
        return {"error": f"image {image}: {exc}"}
    extra = None if experts is None else {"mova": {"experts": list(experts)}}
    try:
        reply = client.chat.completions.create(
            model=model, messages=to_messages(turns, uri), max_tokens=max_new_tokens,
            temperature=0, extra_body=extra)
    except openai.APIError as exc:
        return {"error": f"request: {_failure(exc)}"}
    try:
        text = reply.choices[0].message.content or ""
    except (AttributeError, IndexError, TypeError):
        return {"error": f"request: unexpected response {str(reply)[:200]}"}
    try:
        ext = MoVAInfo.from_response(reply)  # None from a plain OpenAI-compatible server
    except ValidationError as exc:
        return {"error": f"request: the response's mova field does not match the schema: "
                         f"{exc.errors()[0]['msg']}"}
    return {"prediction": text.strip(), "experts": list(ext.experts) if ext else [],
            "routing_reply": ext.routing_reply if ext else None,
            "forced": bool(ext and ext.forced), "pool": ext.pool if ext else None,
            "error": None}


def predict_http(endpoint: str, items: Sequence[dict[str, Any]], *, model: str,
                 api_key: str | None, concurrency: int, max_new_tokens: int,
                 timeout_s: float, max_retries: int) -> list[dict[str, Any]]:
    """Ask every item (``image``, ``turns``, ``experts``) with at most ``concurrency`` requests
    in flight; results in item order. Raises when every request failed."""
    client = openai_client(endpoint, api_key, timeout_s=timeout_s, max_retries=max_retries,
                           concurrency=concurrency)
    with client, ThreadPoolExecutor(max_workers=concurrency,
                                    thread_name_prefix="mova-eval") as pool:
        results = list(pool.map(lambda it: ask_endpoint(
            client, model=model, image=it["image"], turns=it["turns"],
            experts=it["experts"], max_new_tokens=max_new_tokens), items))
    failed = [r["error"] for r in results if (r.get("error") or "").startswith("request:")]
    if failed and len(failed) == len(results):
        raise RuntimeError(f"endpoint {endpoint}: all {len(results)} requests failed; first: "
                           f"{failed[0]}")
    return results


def resolve_api_key(api_key: str | None, api_key_env: str) -> str | None:
    return api_key or (os.environ.get(api_key_env) if api_key_env else None) or None

"""The HTTP side of `mova eval`: ask a running OpenAI-compatible MoVA endpoint, in parallel.

Each question is one ``POST {endpoint}/v1/chat/completions`` (greedy: temperature 0) with the
image as a base64 data URI; forced or labelled routing travels in the ``mova`` extension
field, and the routing decision comes back in the response's ``mova`` field. 429/502/503/504
answers and dropped connections are retried after ``Retry-After`` (or 1 s), up to
``max_retries`` times.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from PIL import Image
from pydantic import ValidationError

from mova.images import ImageError, load_image
from mova.tokenizers import IMAGE_TOKEN
from pipelines.common import storage
from pipelines.common.wire import MoVAInfo

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 502, 503, 504)
MAX_RETRY_WAIT_S = 30.0
_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
_PLACEHOLDER = re.compile(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*")


class EndpointError(RuntimeError):
    """A request that failed for good (after retries, or with a non-retryable status)."""


def api_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def check_endpoint(endpoint: str, api_key: str | None, timeout_s: float = 10.0) -> None:
    """Fail early, naming the endpoint, when it does not answer ``GET /v1/models``."""
    url = endpoint.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(url, headers=api_headers(api_key), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ValueError(f"endpoint {endpoint} cannot be reached ({url}): "
                         f"{type(exc).__name__}: {exc}") from exc
    if response.status_code in (401, 403):
        raise ValueError(f"endpoint {endpoint} refused the API key (HTTP "
                         f"{response.status_code}); set api_key or the api_key_env variable")
    if response.status_code != 200:
        raise ValueError(f"endpoint {endpoint}: GET /v1/models answered HTTP "
                         f"{response.status_code}; is it a MoVA (OpenAI-compatible) server?")


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


def _retry_after(response: httpx.Response | None) -> float:
    raw = response.headers.get("Retry-After") if response is not None else None
    try:
        return min(MAX_RETRY_WAIT_S, max(0.0, float(raw))) if raw is not None else 1.0
    except ValueError:
        return 1.0


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return f"HTTP {response.status_code}: {message or response.text[:200]}"


def post_chat(client: httpx.Client, url: str, body: dict[str, Any], max_retries: int,
              sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """POST one chat completion; retries overload answers and dropped connections."""
    for attempt in range(max_retries + 1):
        response = None
        try:
            response = client.post(url, json=body)
        except httpx.TransportError as exc:
            if attempt == max_retries:
                raise EndpointError(f"{type(exc).__name__}: {exc}") from exc
        else:
            if response.status_code == 200:
                return response.json()
            if response.status_code not in RETRY_STATUS or attempt == max_retries:
                raise EndpointError(_error_message(response))
        wait = _retry_after(response)
        log.debug("retrying %s in %.1f s (attempt %d)", url, wait, attempt + 1)
        sleep(wait)
    raise AssertionError("unreachable")


def ask_endpoint(client: httpx.Client, endpoint: str, *, model: str, image: str,
                 turns: Sequence[dict], experts: list[str] | None, max_new_tokens: int,
                 max_retries: int) -> dict[str, Any]:
    """One question -> ``{prediction, experts, routing_reply, forced, error, pool}``."""
    try:
        uri = image_data_uri(storage.read_bytes(image))
    except (ImageError, OSError, ValueError) as exc:
        return {"error": f"image {image}: {exc}"}
    body: dict[str, Any] = {"model": model, "messages": to_messages(turns, uri),
                            "max_tokens": max_new_tokens, "temperature": 0}
    if experts is not None:
        body["mova"] = {"experts": list(experts)}
    try:
        reply = post_chat(client, endpoint.rstrip("/") + "/v1/chat/completions", body,
                          max_retries)
    except EndpointError as exc:
        return {"error": f"request: {exc}"}
    try:
        text = reply["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
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
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout_s, headers=api_headers(api_key), limits=limits) as client, \
            ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="mova-eval") as pool:
        results = list(pool.map(lambda it: ask_endpoint(
            client, endpoint, model=model, image=it["image"], turns=it["turns"],
            experts=it["experts"], max_new_tokens=max_new_tokens, max_retries=max_retries),
            items))
    failed = [r["error"] for r in results if (r.get("error") or "").startswith("request:")]
    if failed and len(failed) == len(results):
        raise RuntimeError(f"endpoint {endpoint}: all {len(results)} requests failed; first: "
                           f"{failed[0]}")
    return results


def resolve_api_key(api_key: str | None, api_key_env: str) -> str | None:
    return api_key or (os.environ.get(api_key_env) if api_key_env else None) or None

"""Fuzz the whole HTTP API of the running app from its own `/openapi.json` (schemathesis):
no 5xx, no status the document does not declare, no response that breaks its schema, and
fuzzed chat requests that reach the model (half of the generated chat bodies get a real image
and a small max_tokens, so 2xx answers are among them). Bounded: a fixed number of examples
per operation, derandomised."""

from __future__ import annotations

import base64
import io
import json
import zlib

import pytest
from PIL import Image
from served import served_app

pytestmark = pytest.mark.integration
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
POOL = ["sam"]


def _image_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (30, 160, 90)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served_url(tmp_path_factory):
    from mova.factory import build_tiny_mova
    from pipelines.common.ray_init import free_local_port
    from pipelines.common.recipe import load_recipe
    from pipelines.serve.recipe import ServeRecipe

    ckpt = build_tiny_mova(seed=0, experts=POOL).save_pretrained(
        tmp_path_factory.mktemp("fuzz") / "ckpt")
    recipe = load_recipe(ServeRecipe, None, [
        f"checkpoint={ckpt}", f"port={free_local_port()}", f"api_key={KEY}",
        "limits.request_timeout_s=20", "limits.max_tokens=16", "limits.max_body_bytes=2000000",
        "limits.max_image_bytes=1000000", "experts.default.num_replicas=1",
        "experts.default.autoscaling=null"])
    with served_app(recipe, "fuzz") as url:
        yield url


def _reach_the_model(body: dict) -> None:
    """Turn a schema-valid body into one the model answers (kept otherwise as generated)."""
    body["model"] = "mova"
    body["messages"] = [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": _image_uri()}}]}]
    for name in ("max_completion_tokens", "stop", "seed", "temperature", "top_p"):
        body.pop(name, None)
    body["max_tokens"] = 4
    if isinstance(body.get("mova"), dict):
        body["mova"] = {"experts": POOL} if zlib.crc32(repr(body).encode()) % 2 else {}


def _check_events(text: str) -> None:
    """Every event of a stream is a chunk or an error envelope (their published models), and
    the stream ends with [DONE]."""
    from pipelines.serve.openai_response import ChatCompletionChunk, ErrorResponse

    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    for data in events[:-1]:
        body = json.loads(data)
        (ErrorResponse if "error" in body else ChatCompletionChunk).model_validate(body)


def _fuzz(operation, url: str, checks, seen: dict[str, list[int]]):
    label = f"{operation.method.upper()} {operation.path}"
    chat = operation.path == "/v1/chat/completions"

    @given(case=operation.as_strategy())
    @settings(max_examples=80 if chat else 15, deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        if chat and isinstance(case.body, dict) and \
                isinstance(case.body.get("messages"), list) and \
                zlib.crc32(repr(case.body).encode()) % 2 == 0:
            _reach_the_model(case.body)
        response = case.call(base_url=url, headers=AUTH, timeout=60)
        seen.setdefault(label, []).append(response.status_code)
        case.validate_response(response, checks=checks)
        kind = response.headers.get("content-type") or [""]
        if (kind[0] if isinstance(kind, list) else kind).startswith("text/event-stream"):
            _check_events(response.text)

    return run


def test_fuzzed_api_keeps_its_contract(served_url):
    api = schemathesis.openapi.from_url(served_url + "/openapi.json", headers=AUTH)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, response_headers_conformance]
    seen: dict[str, list[int]] = {}
    for result in api.get_all_operations():
        _fuzz(result.ok(), served_url, checks, seen)()
    print(f"\nfuzz statuses: { {k: sorted(set(v)) for k, v in seen.items()} }")
    chat_codes = seen["POST /v1/chat/completions"]
    assert chat_codes.count(200) >= 5 and any(400 <= c < 500 for c in chat_codes), chat_codes
    assert len(seen) >= 6  # every operation was exercised

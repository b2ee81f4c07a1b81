"""Fuzz the whole HTTP API of the running app from its own `/openapi.json` (schemathesis):
no 5xx, no status the document does not declare, no response that breaks its schema, and
fuzzed chat requests that reach the model. The document states the rules a body must follow
(the served model, a user message with an image part, the expert pool, the max_tokens
limit), and the fuzzer is told how to make a value of its one custom format (an image URL:
real images of a few sizes), so schema-valid bodies are answered: no body is rewritten by
hand. Bounded: a fixed number of examples per operation, derandomised."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter

import pytest
from PIL import Image
from served import served_app

pytestmark = pytest.mark.integration
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
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


def _image_uri(size: tuple[int, int], kind: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 160, 90)).save(buf, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = st.sampled_from([_image_uri(size, kind) for size, kind in (
    ((48, 40), "PNG"), ((1, 1), "PNG"), ((300, 4), "JPEG"), ((4, 300), "WEBP"))])


@pytest.fixture(scope="module")
def served_url(tmp_path_factory):
    from mova.factory import build_tiny_mova
    from pipelines.common.ray_init import free_local_port
    from pipelines.common.recipe import load_recipe
    from pipelines.serve.recipe import ServeRecipe

    ckpt = build_tiny_mova(seed=0, experts=POOL).save_pretrained(
        tmp_path_factory.mktemp("fuzz") / "ckpt")
    recipe = load_recipe(ServeRecipe, None, [
        f"checkpoint={ckpt}", f"port={free_local_port()}", f"api_key={KEY}", "llm.engine=torch",
        "limits.request_timeout_s=20", "limits.max_tokens=16", "limits.max_body_bytes=2000000",
        "limits.max_image_bytes=1000000", "experts.default.num_replicas=1",
        "experts.default.autoscaling=null"])
    with served_app(recipe, "fuzz") as url:
        yield url


def no_server_error_but_overload(ctx, response, case):
    """No 5xx, but the documented 503 (with Retry-After): a fuzzed ``mova.timeout_s`` too
    short for any request is refused at once as one that cannot finish in time."""
    if response.status_code == 503:
        assert int(response.headers["retry-after"][0] if isinstance(
            response.headers["retry-after"], list) else response.headers["retry-after"]) >= 1
        assert "deadline" in response.text or "in flight" in response.text, response.text
        return None
    return not_a_server_error(ctx, response, case)


def _check_events(text: str) -> None:
    """Every event of a stream is a chunk or an error envelope (their published models), and
    the stream ends with [DONE]."""
    from pipelines.serve.openai_response import ChatCompletionChunk, ErrorResponse

    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    for data in events[:-1]:
        body = json.loads(data)
        (ErrorResponse if "error" in body else ChatCompletionChunk).model_validate(body)


def _fuzz(operation, url: str, checks, seen: dict[str, list[int]], reasons: Counter):
    label = f"{operation.method.upper()} {operation.path}"
    chat = operation.path == "/v1/chat/completions"

    @given(case=operation.as_strategy())
    @settings(max_examples=60 if chat else 15, deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(base_url=url, headers=AUTH, timeout=60)
        seen.setdefault(label, []).append(response.status_code)
        if chat and response.status_code == 400:
            why = response.json()["error"]
            reasons[f"{why.get('param')}: {why['message'][:90]}"] += 1
        case.validate_response(response, checks=checks)
        kind = response.headers.get("content-type") or [""]
        if (kind[0] if isinstance(kind, list) else kind).startswith("text/event-stream"):
            _check_events(response.text)

    return run


def test_fuzzed_api_keeps_its_contract(served_url):
    from pipelines.serve.openai_request import IMAGE_URL_FORMAT

    schemathesis.openapi.format(IMAGE_URL_FORMAT, IMAGES)
    api = schemathesis.openapi.from_url(served_url + "/openapi.json", headers=AUTH)
    checks = [no_server_error_but_overload, status_code_conformance, content_type_conformance,
              response_schema_conformance, response_headers_conformance]
    seen: dict[str, list[int]] = {}
    reasons: Counter = Counter()  # why chat bodies were refused (printed)
    for result in api.get_all_operations():
        _fuzz(result.ok(), served_url, checks, seen, reasons)()
    print(f"\nchat 400s: {reasons.most_common(8)}")
    print(f"\nfuzz statuses: { {k: sorted(set(v)) for k, v in seen.items()} }")
    chat_codes = seen["POST /v1/chat/completions"]
    # fuzzed bodies, none rewritten, reach the model and are answered
    assert chat_codes.count(200) >= 5 and any(400 <= c < 500 for c in chat_codes), chat_codes
    assert len(seen) >= 6  # every operation was exercised

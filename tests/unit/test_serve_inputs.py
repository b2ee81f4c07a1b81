"""Hostile input without Ray: image headers checked before decoding, remote images behind an
allowlist with public addresses only, the HTTP guard (API key on every route, body cap, 405),
the published OpenAPI contract and the refusal to serve openly beyond loopback."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import logging
import struct
import threading
import time
import zlib

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.serve import remote, sources
from pipelines.serve.api import build_api
from pipelines.serve.errors import APIError
from pipelines.serve.recipe import ServeRecipe


def _png_header_bomb(side: int) -> bytes:
    """A valid PNG of side x side black pixels, a few KB (zlib of zeros), built row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + \
        chunk(b"IEND", b"")


def test_large_images_are_refused_from_the_header_before_any_pixel_is_decoded(monkeypatch):
    bomb = _png_header_bomb(7900)
    assert len(bomb) < 100_000
    decoded = []
    monkeypatch.setattr(sources, "load_image", lambda data: decoded.append(1))
    with pytest.raises(APIError) as info:
        sources.decode_image(bomb, max_side=1024)
    assert (info.value.status, info.value.code) == (400, "image_too_large")
    assert "7900x7900" in info.value.message and not decoded
    buf = io.BytesIO()
    Image.new("RGB", (1024, 600), (1, 2, 3)).save(buf, "PNG")
    monkeypatch.undo()
    assert sources.decode_image(buf.getvalue(), max_side=1024).size == (1024, 600)
    with pytest.raises(APIError, match="1025x600"):
        big = io.BytesIO()
        Image.new("RGB", (1025, 600)).save(big, "PNG")
        sources.decode_image(big.getvalue(), max_side=1024)


@pytest.mark.parametrize("address, allowed", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("172.16.5.4", False),
    ("169.254.169.254", False), ("169.254.1.1", False), ("100.100.100.200", False),
    ("::1", False), ("fe80::1", False), ("fd00:ec2::254", False), ("0.0.0.0", False),
    ("::ffff:127.0.0.1", False), ("224.0.0.1", False), ("100.64.0.1", False),
])
def test_only_public_addresses(address, allowed):
    assert remote.address_allowed(address) is allowed


def test_allowlist_matches_hosts_and_subdomains():
    domains = ["images.example.com", ".cdn.example.org"]
    assert remote.host_allowed("images.example.com", domains)
    assert remote.host_allowed("a.cdn.example.org", domains)
    assert not remote.host_allowed("cdn.example.org", domains)
    assert not remote.host_allowed("images.example.com.evil.net", domains)
    assert not remote.host_allowed("evil-images.example.com", domains)


class _Images(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(3)
        else:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "PNG")
    _Images.body = buf.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], buf.getvalue()
    server.shutdown()


def test_remote_fetch_policy(image_server, monkeypatch, caplog):
    port, png = image_server

    async def resolve(host, _port):
        return {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"],
                "internal.test": ["10.0.0.7"]}[host]

    def fetch(url, **kw):
        args = {"domains": ["images.test"], "max_bytes": 10_000, "timeout_s": 1.0,
                "resolver": resolve, **kw}
        return asyncio.run(remote.fetch_remote(url, **args))

    base = f"http://images.test:{port}"
    with pytest.raises(APIError, match="non-public"):  # loopback, as resolved: refused
        fetch(f"{base}/a.png")
    for url in (f"http://other.test:{port}/a.png", f"http://127.0.0.1:{port}/a.png"):
        with pytest.raises(APIError, match="allowlist"):
            fetch(url)
    with pytest.raises(APIError, match="non-public"):  # allowed name, private address
        fetch(f"http://internal.test:{port}/a.png", domains=["internal.test"])
    # what the policy would let through is fetched from the address resolved once
    monkeypatch.setattr(remote, "address_allowed", lambda a: a == "127.0.0.1")
    assert fetch(f"{base}/a.png") == png
    with pytest.raises(APIError, match="larger than 10 bytes"):
        fetch(f"{base}/a.png", max_bytes=10)
    hop = f"{base}/redirect?to=http://images.test:{port}/a.png"
    with pytest.raises(APIError, match="redirects more than 0"):
        fetch(hop)
    assert fetch(hop, max_redirects=1) == png  # each hop checked again
    with pytest.raises(APIError, match="allowlist"):
        fetch(f"{base}/redirect?to=http://other.test:{port}/a.png", max_redirects=1)
    # every pinned address is tried, IPv4 first: nothing listens on ::1 or 127.0.0.2
    monkeypatch.setattr(remote, "address_allowed", lambda a: True)

    async def dual_stack(host, _port):
        return ["::1", "127.0.0.2", "127.0.0.1"]

    caplog.set_level(logging.INFO, logger=remote.__name__)
    assert fetch(f"{base}/a.png", resolver=dual_stack) == png
    assert [r.getMessage().split(": ")[1].split()[0] for r in caplog.records
            if "did not accept" in r.getMessage()] == ["127.0.0.2"]  # ::1 never needed

    async def nowhere(host, _port):
        return ["::1", "127.0.0.2"]

    with pytest.raises(APIError, match="cannot be fetched: ConnectError"):
        fetch(f"{base}/a.png", resolver=nowhere)
    start = time.monotonic()
    with pytest.raises(APIError, match="longer than 1 s"):
        fetch(f"{base}/slow")
    assert time.monotonic() - start < 2.5


class FakeService:
    def __init__(self, key: str | None, public_health: bool = False) -> None:
        self.api_key, self.public_health, self.max_body_bytes = key, public_health, 1000
        self.bodies: list[int] = []

    async def chat(self, request):
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                from pipelines.serve.errors import payload_too_large

                raise payload_too_large(self.max_body_bytes)
        self.bodies.append(size)
        return JSONResponse({"ok": True})

    async def ready(self):
        return {"status": "ready", "latency_ms": 1.0}

    async def metrics_text(self):
        return "ray_mova_requests_total 1\n"

    def models(self):
        return {"object": "list", "data": []}

    def model(self, model_id):
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "mova"}

    def limits(self):
        return {"max_body_bytes": self.max_body_bytes, "max_tokens": 16, "max_stop": 4}

    def served(self):
        return {"model": "mova", "experts": ["sam", "dinov2"]}


def test_api_key_guards_every_route_and_the_body_is_capped():
    client = TestClient(build_api(FakeService("k")))
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/metrics"),
                         ("GET", "/openapi.json"), ("GET", "/ready"), ("GET", "/nope"),
                         ("POST", "/v1/chat/completions"), ("GET", "/docs")):
        resp = client.request(method, path)
        assert resp.status_code == 401, (method, path)
        assert resp.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer k"}
    assert client.get("/health", headers=auth).json() == {"status": "ok"}
    assert client.get("/nope", headers=auth).status_code == 404
    wrong = client.delete("/v1/models", headers=auth)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    big = client.post("/v1/chat/completions", headers=auth, content=b"x" * 1001)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: refused before any of it is read
        yield b"y" * 100

    streamed = client.post("/v1/chat/completions", headers=auth, content=chunks())
    assert streamed.status_code == 411 and streamed.json()["error"]["code"] == "length_required"
    open_health = TestClient(build_api(FakeService("k", public_health=True)))
    assert open_health.get("/health").status_code == 200
    assert open_health.get("/v1/models").status_code == 401


def test_the_proxy_refuses_a_chunked_body_without_reading_it():
    """The middleware Serve's proxy loads (named in our Ray environment) answers a chunked
    request with the ingress's 411 envelope and never calls ``receive``."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    from pipelines.common.ray_init import COMMON_ENV
    from pipelines.serve.proxy_guard import ChunkedBodyGuard

    loaded = validate_http_proxy_callback_return(call_function_from_import_path(
        COMMON_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]))
    assert [m.cls for m in loaded] == [ChunkedBodyGuard]
    passed, sent = [], []

    async def app(scope, receive, send):
        passed.append(scope["path"])

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    guard = ChunkedBodyGuard(app)
    for headers in ([(b"content-length", b"5")], [], [(b"Transfer-Encoding", b"gzip, Chunked")]):
        asyncio.run(guard({"type": "http", "path": str(len(headers)), "headers": headers},
                          receive, send))
    assert passed == ["1", "0"]
    start, body = sent
    assert start["status"] == 411 and (b"connection", b"close") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "length_required"


def test_openapi_publishes_the_contract():
    schema = TestClient(build_api(FakeService("k"))).get(
        "/openapi.json", headers={"Authorization": "Bearer k"}).json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatRequest")
    assert set(chat["responses"]) == {"200", "400", "401", "404", "405", "408", "411", "413",
                                      "503"}
    for status, response in chat["responses"].items():
        if status != "200":
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), status
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    event = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"][1]["contentSchema"]
    assert [ref["$ref"].rsplit("/", 1)[1] for ref in event["anyOf"]] == [
        "ChatCompletionChunk", "ErrorResponse"]
    components = schema["components"]["schemas"]
    for name in ("ChatRequest", "ChatCompletion", "ChatCompletionChunk", "ErrorResponse",
                 "MoVAInfo", "ModelList"):
        assert name in components, name
    assert components["ChatRequest"]["additionalProperties"] is False
    assert schema["info"]["x-mova-limits"] == {"max_body_bytes": 1000, "max_tokens": 16,
                                               "max_stop": 4}
    # the rules JSON Schema can state: the served model, the pool, the limits, an image
    fields = components["ChatRequest"]["properties"]
    assert fields["model"]["enum"] == ["mova"]
    assert {"type": "integer", "minimum": 1, "maximum": 16} in fields["max_tokens"]["anyOf"]
    stops = {b["type"]: b for b in fields["stop"]["anyOf"]}
    assert stops["string"]["minLength"] == 1 and stops["array"]["maxItems"] == 4
    experts = components["MoVAOptions"]["properties"]["experts"]["anyOf"][0]
    assert experts["items"]["enum"] == ["sam", "dinov2"]
    contains = fields["messages"]["contains"]
    assert contains["properties"]["role"] == {"const": "user"}
    image, text = contains["properties"]["content"]["allOf"]
    assert image["contains"]["properties"]["type"] == {"const": "image_url"}
    assert text["contains"]["properties"]["text"] == {"pattern": "[^\\s]"}
    assert components["ImageURL"]["properties"]["url"]["format"] == "image-url"
    assert "Retry-After" in chat["responses"]["503"]["headers"]
    assert schema["security"] == [{"bearer": []}]


@pytest.mark.parametrize("host, key, allow, ok", [
    ("127.0.0.1", None, False, True), ("localhost", None, False, True),
    ("0.0.0.0", None, False, False), ("10.0.0.5", None, False, False),
    ("0.0.0.0", "k", False, True), ("0.0.0.0", None, True, True),
])
def test_no_open_endpoint_beyond_loopback(host, key, allow, ok, monkeypatch):
    monkeypatch.delenv("MOVA_API_KEY", raising=False)
    recipe = ServeRecipe(checkpoint="c", host=host, api_key=key, allow_unauthenticated=allow)
    if ok:
        recipe.check_exposure()
    else:
        with pytest.raises(ValueError, match="allow_unauthenticated"):
            recipe.check_exposure()
    monkeypatch.setenv("MOVA_API_KEY", "from-env")
    recipe.check_exposure()

"""A guard in Serve's HTTP proxy itself: a chunked request body is refused before it is read.

Serve forwards a request's body from the proxy to the replica as it arrives, and the replica
pulls all of it whether the app reads it or not, so the ingress's own 411 (``api.Guard``)
comes after the proxy has already buffered and shipped the body. Ray Serve loads proxy
middlewares from the import path in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read by each
proxy process at start: ``pipelines.common.ray_init.COMMON_ENV`` names :func:`middlewares`
there, so every Ray we start has it, and the cluster image sets it too. A proxy started
without it still refuses chunked bodies, at the ingress, after reading them.
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware

from pipelines.serve.errors import length_required


def is_chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether ASGI ``headers`` announce a chunked body (a body of unknown size)."""
    return any(name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
               for name, value in headers)


class ChunkedBodyGuard:
    """Pure ASGI middleware: answers a chunked request with the ingress's 411 envelope and
    closes the connection, without calling ``receive`` (so no byte of the body is read)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_chunked(scope.get("headers", [])):
            await self.app(scope, receive, send)
            return
        error = length_required()
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """What Serve's proxy wraps its app in (called once per proxy process)."""
    return [Middleware(ChunkedBodyGuard)]

"""OpenAI-style error envelopes, and the mapping from Ray/Serve failures to HTTP statuses.

Every error leaves the server healthy: bad input is a 400 before any model work (413 for a body
over the limit), a missing, dead or unhealthy replica or a full queue a 503 (with
``Retry-After``), a deadline a 408.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import exceptions as rx
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """Bad input found inside a deployment (travels back to the ingress as a 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self):
        return (type(self), (str(self), self.param, self.code))


class DeadlineExceeded(TimeoutError):
    """A request's deadline passed inside a deployment (travels back as a 408)."""

    def __reduce__(self):
        return (type(self), self.args)


class ReplicaUnhealthy(RuntimeError):
    """A replica found itself stuck (a batch far past its deadline) and refuses work until
    Serve replaces it (travels back as a 503 with ``Retry-After``)."""

    def __reduce__(self):
        return (type(self), self.args)


class APIError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None,
                code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str = "the server is overloaded; retry shortly",
               retry_after_s: int = 1) -> APIError:
    return APIError(503, message, type="server_error", code="overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="unavailable",
                    headers={"Retry-After": "2"})


def payload_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes",
                    code="request_too_large")


def length_required() -> APIError:
    return APIError(411, "send the request body with a Content-Length header: a body without "
                         "one (chunked) is not accepted, since its size must be checked "
                         "before any of it is read", code="length_required")


def timeout(seconds: float) -> APIError:
    return APIError(408, f"the request did not finish within {seconds:g} s",
                    type="timeout_error", code="timeout")


def _ray_failure_types() -> tuple[type[BaseException], ...]:
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError",
             "OwnerDiedError", "WorkerCrashedError", "NodeDiedError",
             "ObjectFetchTimedOutError", "ReferenceCountingAssertionError")
    found = tuple(getattr(rx, n) for n in names if hasattr(rx, n))
    return (RayServeException, *found)


def to_api_error(exc: BaseException, *, timeout_s: float | None = None) -> APIError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the replica's exception
    if isinstance(cause, RequestError):
        exc = cause
    if isinstance(cause, (DeadlineExceeded, ReplicaUnhealthy)):
        exc = cause
    if isinstance(exc, RequestError):
        return bad_request(exc.args[0] if exc.args else "bad request", param=exc.param,
                           code=exc.code or "invalid_value")
    if isinstance(exc, ReplicaUnhealthy):
        return unavailable(f"a model replica is unhealthy and being replaced ({exc}); retry "
                           "shortly")

    if isinstance(exc, BackPressureError):
        return overloaded(f"the server is overloaded ({exc.message}); retry shortly")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return timeout(timeout_s or 0.0)
    if isinstance(exc, _ray_failure_types()):
        log.warning("a model replica failed: %s", _first_line(exc))
        return unavailable(f"a model replica is unavailable ({type(exc).__name__}); retry "
                           "shortly")
    log.exception("internal error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                    code="internal_error")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def install_handlers(app) -> None:
    """Answer every error of a FastAPI app with an OpenAI error envelope."""
    def respond(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return respond(bad_request(first.get("msg", "invalid request"), param=param))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers or {})
        return respond(APIError(exc.status_code, str(exc.detail), code=code, headers=headers))

    @app.exception_handler(Exception)
    async def _other(request, exc: Exception):
        return respond(to_api_error(exc))

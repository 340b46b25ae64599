"""Typed client errors and the handlers that turn every failure into ``{"error": {"code", "message"}}``.

A client mistake raises an ``ApiError`` subclass (a 4xx with a message that says what to fix);
anything else is logged with its traceback and answered with a plain 500. The Open Inference
Protocol routes (``/v2``) get that protocol's shape, ``{"error": "<message>"}``, instead.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

# nginx's code for "the client closed the request": nobody reads it, the metrics and logs do.
CLIENT_CLOSED_REQUEST = 499

logger = logging.getLogger("dynfuse")


class ApiError(Exception):
    status = 400
    code = "bad_request"
    reason = "invalid"  # label of dynfuse_rejected_requests_total

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class MalformedRequest(ApiError):
    status, code = 400, "malformed_request"


class Unauthorized(ApiError):
    status, code, reason = 401, "unauthorized", "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    """The call is not allowed in this server's configuration, whoever makes it (model control is off)."""

    status, code, reason = 403, "forbidden", "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Superseded(ApiError):
    """A control call whose outcome a call asked after it has replaced (on another worker): that one wins."""

    status, code = 409, "superseded"


class LoadRefused(ApiError):
    """A model version that cannot be served (a changed byte, a failed warm-up): refused, and what served
    before keeps serving. 400, as Triton answers a failed load."""

    status, code = 400, "load_refused"


class PayloadTooLarge(ApiError):
    status, code, reason = 413, "payload_too_large", "too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class InvalidInput(ApiError):
    status, code = 422, "invalid_input"


class RequestTimeout(ApiError):
    """The client did not send its whole body before the request's deadline."""

    status, code, reason = 408, "request_timeout", "body_timeout"


class HeadersTooLarge(ApiError):
    status, code, reason = 431, "headers_too_large", "too_large"


class Overloaded(ApiError):
    """The micro-batcher's queue is full."""

    status, code, reason = 503, "overloaded", "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class OverCapacity(Overloaded):
    """More requests in flight than the server admits: refused before its body is read."""

    reason = "over_capacity"


class DeadlineExceeded(ApiError):
    """The request's deadline passed before it was served (the server was too slow, not the client)."""

    status, code, reason = 504, "deadline_exceeded", "deadline"


class NotReady(ApiError):
    status, code, reason = 503, "not_ready", "not_ready"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


def error_body(path: str, code: str, message: str) -> dict:
    """The error body for a request path: the KServe v2 shape under /v2, the /v1 shape elsewhere."""
    if path.startswith("/v2"):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def install_error_handlers(app: FastAPI, on_rejected=None) -> None:
    """``on_rejected(reason)`` is called for every refused request (for the rejections metric)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return api_error_response(request.url.path, error, on_rejected)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        if on_rejected is not None:
            on_rejected("invalid")
        message = describe_validation_errors(error.errors())
        return JSONResponse(error_body(request.url.path, "invalid_input", message), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        body = error_body(request.url.path, code, str(error.detail))
        return JSONResponse(body, error.status_code, headers=error.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, error: ClientDisconnect) -> Response:
        return client_gone_response(request, on_rejected)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return unexpected_error_response(request, error)


def api_error_response(path: str, error: ApiError, on_rejected=None) -> JSONResponse:
    """A client error's answer, in the shape of the path's protocol."""
    if on_rejected is not None:
        on_rejected(error.reason)
    return JSONResponse(error_body(path, error.code, error.message), error.status, headers=error.headers)


def client_gone_response(request: Request, on_rejected=None) -> Response:
    """What a request whose client went away mid-body is answered (if anyone still listens): 499."""
    logger.debug("client went away during %s %s", request.method, request.url.path)
    if on_rejected is not None:
        on_rejected("client_disconnect")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def unexpected_error_response(request: Request, error: Exception) -> JSONResponse:
    """A server fault: logged with its traceback, answered with a plain 500."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse(error_body(request.url.path, "internal_error", "internal server error"), 500)


def describe_validation_errors(errors: list[dict]) -> str:
    """Pydantic's error list as one readable line: 'threshold: must be <= 1; route: ...'."""
    parts = []
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"

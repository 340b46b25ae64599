"""Pure ASGI middleware (no per-request task or body copy): the body-size limit and the request metrics."""

from __future__ import annotations

import json
import time

from service.errors import PayloadTooLarge, error_body
from service.metrics import Metrics


def is_inference_path(path: str) -> bool:
    return path.startswith("/v1/classify") or (path.startswith("/v2/models/") and path.endswith("/infer"))


class BodySizeLimit:
    """413 for a body over ``max_bytes``: at once from Content-Length, or as soon as a streamed body passes it."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            self.metrics.reject("too_large")
            message = f"request body of {declared} bytes is over the limit of {self.max_bytes:,} bytes"
            return await _send_error(scope, send, 413, "payload_too_large", message)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the app's body read, so the app's error handler answers 413.
                    raise PayloadTooLarge(f"request body is over the limit of {self.max_bytes:,} bytes")
            return message

        return await self.app(scope, limited_receive, send)


class RequestMetrics:
    """Counts inference requests by status, times them and tracks how many are in flight."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_inference_path(scope["path"]):
            return await self.app(scope, receive, send)
        model = self.metrics.model
        status = 500  # what the client sees if the app dies before answering

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.inflight.labels(model).inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.inflight.labels(model).dec()
            self.metrics.requests.labels(model, str(status)).inc()
            self.metrics.request_duration.labels(model).observe(time.perf_counter() - started)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1").strip()
    return None


async def _send_error(scope, send, status: int, code: str, message: str) -> None:
    payload = json.dumps(error_body(scope["path"], code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            # The body was not read: the connection can't be reused for another request.
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})

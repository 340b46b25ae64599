"""Pure ASGI middleware (no per-request task or body copy): the body-size limit, and the error answers
that middleware sends.

Admission (capacity, readiness, deadlines, and the request metrics) has its own module,
``service/admission.py``.
"""

from __future__ import annotations

import asyncio
import json

from service.errors import PayloadTooLarge, error_body
from service.metrics import Metrics


def is_inference_path(path: str) -> bool:
    return path.startswith("/v1/classify") or (path.startswith("/v2/models/") and path.endswith("/infer"))


class BodySizeLimit:
    """413 for a body over ``max_bytes``: at once from Content-Length, or as soon as a streamed body passes it.

    A client that writes its whole body before it reads the answer (Python's urllib, requests) would get a
    connection reset instead of the 413 if the server answered and closed while it was still writing. So,
    as nginx's lingering close does, what the client still sends is read and discarded first, within
    ``drain_max_bytes`` and ``drain_timeout_s``; past those bounds the 413 goes out and the connection is
    closed. A client that sent ``Expect: 100-continue`` has sent no body yet: it gets the 413 at once.
    """

    def __init__(self, app, max_bytes: int, metrics: Metrics, drain_max_bytes: int = 0, drain_timeout_s: float = 0.0):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.drain_max_bytes = drain_max_bytes
        self.drain_timeout_s = drain_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            self.metrics.reject("too_large")
            drained = False
            if declared.isdigit() and int(declared) <= self.drain_max_bytes and not _expects_continue(scope):
                drained = await self._drain(receive, received=0)
            message = f"request body of {declared} bytes is over the limit of {self.max_bytes:,} bytes"
            return await send_error(scope, send, 413, "payload_too_large", message, close=not drained)

        received = 0
        close = False

        async def limited_receive():
            nonlocal received, close
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        close = not await self._drain(receive, received)
                    # Raised inside the app's body read, so the app's error handler answers 413.
                    raise PayloadTooLarge(f"request body is over the limit of {self.max_bytes:,} bytes")
            return message

        async def send_closing(message):
            if close and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, limited_receive, send_closing)

    async def _drain(self, receive, received: int) -> bool:
        """Read and discard the rest of the body; True when it ended within the bounds."""
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + self.drain_timeout_s
        while received <= self.drain_max_bytes:
            remaining = stop_at - loop.time()
            if remaining <= 0:
                return False
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                return False
            if message["type"] != "http.request":
                return False  # the client went away
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return received <= self.drain_max_bytes
        return False


def header(scope, name: bytes) -> str | None:
    value = raw_header(scope, name)
    return None if value is None else value.decode("latin-1").strip()


def raw_header(scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) as sent, in bytes."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _expects_continue(scope) -> bool:
    return (header(scope, b"expect") or "").lower() == "100-continue"


async def send_error(
    scope, send, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """An error response sent by middleware, in the shape of the path's protocol (v1 or v2)."""
    start, body = error_messages(scope["path"], status, code, message, headers=headers, close=close)
    await send(start)
    await send(body)


def error_messages(
    path: str, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, close: bool = False
) -> tuple[dict, dict]:
    """The two ASGI messages of an error response for ``path``: its start and its body."""
    payload = json.dumps(error_body(path, code, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    for name, value in (headers or {}).items():
        raw_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    if close:  # the body was not (all) read: the connection can't carry another request
        raw_headers.append((b"connection", b"close"))
    start = {"type": "http.response.start", "status": status, "headers": raw_headers}
    return start, {"type": "http.response.body", "body": payload}

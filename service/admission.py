"""Admission before work: what an inference request may cost is decided before it costs anything.

``Admission`` is pure ASGI and sits in front of the inference routes. Before a byte of the body is
read, a JSON parsed or an image decoded, it answers at once:

- 431 when the headers are over ``MAX_HEADER_BYTES``;
- 503 ``not_ready`` while the model loads;
- 503 ``overloaded`` (reason ``over_capacity``) when ``capacity`` requests are already admitted.

No body is read, parsed or decoded for a refusal, but the HTTP exchange itself (uvicorn's parsing,
the ASGI call, two writes) still costs about 0.2 ms of CPU (bench/BENCHMARKS.md, figure 5). Clients
that ignore Retry-After and retry at once would spend that on as many refusals as the CPU allows, and
take it from the requests being served. So refusals are paced: at most ``refusals_per_s`` are answered
per second; the others wait their turn, a sleeping coroutine that costs nothing, but never longer
than ``MAX_REFUSAL_HOLD_S``. Under a light overload a refusal goes out at once; under a heavy one the
refusals cost a bounded share of the CPU.

Every admitted request gets a deadline, ``request_timeout_s`` from its arrival (``deadline_of``):
past it, the request is cancelled wherever it is and answered 408 when its body had not arrived yet
(the client's fault) or 504 otherwise. The ``dynfuse_inflight_requests`` gauge counts admitted
requests.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.errors import ApiError, DeadlineExceeded, HeadersTooLarge, NotReady, OverCapacity, RequestTimeout
from service.metrics import Metrics
from service.middleware import header, is_inference_path, send_error

logger = logging.getLogger("dynfuse")

DEADLINE_KEY = "dynfuse.deadline"  # in the ASGI scope: time.monotonic() by which the request must be answered
MAX_HEADER_BYTES = 64 * 1024  # nginx answers 400 past 4 x 8 KiB by default; we allow more, and answer 431
# Past this the pacing gives up and answers anyway: client timeouts are rarely shorter, and held
# connections should not pile up for ever.
MAX_REFUSAL_HOLD_S = 3.0


def deadline_of(scope_or_request) -> float | None:
    """The request's deadline (``time.monotonic()``), set at admission; None outside the inference paths."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return scope.get(DEADLINE_KEY)


class Admission:
    def __init__(
        self,
        app,
        *,
        state,
        metrics: Metrics,
        capacity: int,
        request_timeout_s: float,
        max_body_bytes: int,
        retry_after_s: int = 1,
        refusals_per_s: float = 200.0,
        max_refusal_hold_s: float = MAX_REFUSAL_HOLD_S,
    ):
        self.app = app
        self.state = state  # the app's state: ``service`` is None until the model is loaded
        self.metrics = metrics
        self.capacity = capacity
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s
        self.refusal_interval_s = 1.0 / refusals_per_s
        self.max_refusal_hold_s = max_refusal_hold_s
        self.admitted = 0
        self._next_refusal = 0.0  # loop time before which no further refusal is answered
        self._inflight = metrics.inflight.labels(metrics.model)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_inference_path(scope["path"]):
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await self._refuse(scope, send, refusal)

        self.admitted += 1
        self._inflight.inc()
        deadline = time.monotonic() + self.request_timeout_s
        scope[DEADLINE_KEY] = deadline
        body_done = False
        response_started = False

        async def tracked_receive():
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await _run_until(deadline, self.app(scope, tracked_receive, tracked_send))
        except TimeoutError:
            if response_started:  # too late to answer anything else; the server closes the connection
                return None
            error = (
                RequestTimeout(f"the request body did not arrive within {self.request_timeout_s:g} s")
                if not body_done
                else DeadlineExceeded(f"no answer within the request deadline of {self.request_timeout_s:g} s")
            )
            self.metrics.reject(error.reason)
            await send_error(scope, send, error.status, error.code, error.message, close=not body_done)
        finally:
            self.admitted -= 1
            self._inflight.dec()

    def _refusal(self, scope) -> ApiError | None:
        """Why this request is refused before any work, or None to admit it."""
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            return HeadersTooLarge(f"the request headers are over the limit of {MAX_HEADER_BYTES:,} bytes")
        not_serving = self.state.repository.not_serving
        if not_serving is not None:
            return NotReady(not_serving)
        if self.admitted >= self.capacity:
            return OverCapacity(
                f"the server is at capacity ({self.capacity} requests in flight); retry after {self.retry_after_s} s",
                self.retry_after_s,
            )
        return None

    async def _refuse(self, scope, send, error: ApiError) -> None:
        self.metrics.reject(error.reason)
        if error.status == 503:
            await asyncio.sleep(self._refusal_delay())
        # Unread, a body of a declared length within the limit is discarded by the server's parser and the
        # connection kept; a larger or chunked one could go on for ever, so that connection is closed.
        declared = header(scope, b"content-length")
        if declared is None:
            unbounded = header(scope, b"transfer-encoding") is not None
        else:
            unbounded = not declared.isdigit() or int(declared) > self.max_body_bytes
        await send_error(scope, send, error.status, error.code, error.message, headers=error.headers, close=unbounded)

    def _refusal_delay(self) -> float:
        """Seconds until this refusal's turn: one every ``refusal_interval_s``, at most the maximum hold."""
        now = asyncio.get_running_loop().time()
        turn = min(max(now, self._next_refusal), now + self.max_refusal_hold_s)
        self._next_refusal = turn + self.refusal_interval_s
        return turn - now


async def _run_until(deadline: float, coroutine) -> None:
    """Await ``coroutine``, cancelled with TimeoutError at ``deadline`` (``time.monotonic()``)."""
    loop = asyncio.get_running_loop()
    when = loop.time() + (deadline - time.monotonic())
    if hasattr(asyncio, "timeout_at"):  # Python 3.11+: no extra task per request
        async with asyncio.timeout_at(when):
            await coroutine
        return
    try:  # pragma: no cover - Python 3.10
        await asyncio.wait_for(coroutine, max(0.0, when - loop.time()))
    except asyncio.TimeoutError as error:  # pragma: no cover
        raise TimeoutError from error

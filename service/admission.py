"""Admission before work: what an inference request may cost is decided before it costs anything.

``Admission`` is the front door: pure ASGI, in front of FastAPI's whole stack (``DynfuseApp`` in
``service/main.py`` calls it first), and it guards the inference routes. Before a byte of the body is
read, a JSON parsed or an image decoded, it answers at once:

- 431 when the headers are over ``MAX_HEADER_BYTES``;
- 503 ``not_ready`` while the model loads;
- 503 ``overloaded`` (reason ``over_capacity``) when ``capacity`` requests are already admitted.

One event-loop thread runs all of a process's request Python (parsing, decoding, rendering), and at
capacity it is the busiest part of the server (bench/BENCHMARKS.md, figure 5): whatever a refusal costs
is taken from the requests being served. So an over-capacity refusal never enters FastAPI's stack (its
middleware, exception handlers and router cost three times what uvicorn's HTTP exchange does) and its
answer is built once, at start-up. Even so the exchange itself costs CPU, and clients that ignore
Retry-After and retry at once would spend it on as many refusals as the CPU allows. So refusals are
paced: at most ``refusals_per_s`` are answered per second; the others wait their turn, a sleeping
coroutine that costs nothing, but never longer than ``MAX_REFUSAL_HOLD_S``. Under a light overload a
refusal goes out at once; under a heavy one the refusals cost a bounded share of the CPU.

Every admitted request gets a deadline, ``request_timeout_s`` from its arrival (``deadline_of``):
past it, the request is cancelled wherever it is and answered 408 when its body had not arrived yet
(the client's fault) or 504 otherwise. The ``dynfuse_inflight_requests`` gauge counts admitted
requests. Every inference request, refused or admitted, is counted here by status and timed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.errors import ApiError, DeadlineExceeded, HeadersTooLarge, NotReady, OverCapacity, RequestTimeout
from service.metrics import ANONYMOUS, Metrics
from service.middleware import error_messages, header, is_inference_path, raw_header, send_error

logger = logging.getLogger("dynfuse")

DEADLINE_KEY = "dynfuse.deadline"  # in the ASGI scope: time.monotonic() by which the request must be answered
KEY_NAME_KEY = "dynfuse.key_name"  # in the ASGI scope: the name of the inference key presented, or None
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
        self._over_capacity = OverCapacity(
            f"the server is at capacity ({capacity} requests in flight); retry after {retry_after_s} s", retry_after_s
        )
        # The over-capacity answer in every shape it takes: v1 or v2 error body, connection kept or closed.
        self._prepared = {
            (v2, close): error_messages(
                "/v2/models/-/infer" if v2 else "/v1/classify",
                503,
                self._over_capacity.code,
                self._over_capacity.message,
                headers=self._over_capacity.headers,
                close=close,
            )
            for v2 in (False, True)
            for close in (False, True)
        }

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not is_inference_path(scope["path"]):
            if _header_bytes(scope) > MAX_HEADER_BYTES:  # every path: no route reads more than this
                error = HeadersTooLarge(f"the request headers are over the limit of {MAX_HEADER_BYTES:,} bytes")
                return await send_error(scope, send, error.status, error.code, error.message)
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        key = self._key_label(scope)
        refusal = self._refusal(scope)
        if refusal is self._over_capacity:  # the common refusal under a spike: as cheap as it can be
            await self._refuse_over_capacity(scope, send)
            return self.metrics.count_request(503, time.perf_counter() - started, key)
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return self.metrics.count_request(refusal.status, time.perf_counter() - started, key)

        self.admitted += 1
        self._inflight.inc()
        deadline = time.monotonic() + self.request_timeout_s
        scope[DEADLINE_KEY] = deadline
        body_done = False
        status = None  # of the answer, once it has started

        async def tracked_receive():
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await run_until(deadline, self.app(scope, tracked_receive, tracked_send))
        except TimeoutError:
            if status is not None:  # too late to answer anything else; the server closes the connection
                return None
            error = (
                RequestTimeout(f"the request body did not arrive within {self.request_timeout_s:g} s")
                if not body_done
                else DeadlineExceeded(f"no answer within the request deadline of {self.request_timeout_s:g} s")
            )
            self.metrics.reject(error.reason)
            status = error.status
            await send_error(scope, send, error.status, error.code, error.message, close=not body_done)
        finally:
            self.admitted -= 1
            self._inflight.dec()
            # 500: what the client sees if the app died before answering
            self.metrics.count_request(status or 500, time.perf_counter() - started, key)

    def _key_label(self, scope) -> str:
        """The name of the inference key the request carries (for the metrics; the route checks it), kept in the
        scope so that the route's check does not hash it again."""
        access = getattr(self.state, "access", None)
        if access is None or not access.keys_required:
            return ANONYMOUS
        name = access.key_name(raw_header(scope, b"authorization"))
        scope[KEY_NAME_KEY] = name
        return name or ANONYMOUS

    def _refusal(self, scope) -> ApiError | None:
        """Why this HTTP request is refused before any work, or None to admit it."""
        if _header_bytes(scope) > MAX_HEADER_BYTES:
            return HeadersTooLarge(f"the request headers are over the limit of {MAX_HEADER_BYTES:,} bytes")
        return self.refusal()

    # -- another front door (gRPC, service/grpc/): the same capacity, readiness and pacing --------
    def admit(self) -> ApiError | None:
        """Admit one inference request that did not come through ``__call__``: None when admitted (then call
        ``release`` once it is answered), else the refusal to answer it with. HTTP and gRPC requests share the
        capacity."""
        refusal = self.refusal()
        if refusal is None:
            self.admitted += 1
            self._inflight.inc()
        return refusal

    def release(self) -> None:
        self.admitted -= 1
        self._inflight.dec()

    async def pace(self, refusal: ApiError) -> None:
        """Hold a 503 refusal until its turn, as HTTP's refusals are held (at most ``max_refusal_hold_s``)."""
        if refusal.status == 503:
            await self._paced()

    def refusal(self) -> ApiError | None:
        """Why an inference request is refused before any work (not serving, over capacity), or None."""
        not_serving = self.state.repository.not_serving
        if not_serving is not None:
            return NotReady(not_serving)
        if self.admitted >= self.capacity:
            return self._over_capacity
        return None

    async def _refuse(self, scope, send, error: ApiError) -> None:
        self.metrics.reject(error.reason)
        if error.status == 503:
            await self._paced()
        close = _unbounded_body(scope, self.max_body_bytes)
        await send_error(scope, send, error.status, error.code, error.message, headers=error.headers, close=close)

    async def _refuse_over_capacity(self, scope, send) -> None:
        self.metrics.reject(self._over_capacity.reason)
        await self._paced()
        start, body = self._prepared[(scope["path"].startswith("/v2/"), _unbounded_body(scope, self.max_body_bytes))]
        await send(start)
        await send(body)

    async def _paced(self) -> None:
        delay = self._refusal_delay()
        if delay > 0:
            await asyncio.sleep(delay)

    def _refusal_delay(self) -> float:
        """Seconds until this refusal's turn: one every ``refusal_interval_s``, at most the maximum hold."""
        now = asyncio.get_running_loop().time()
        turn = min(max(now, self._next_refusal), now + self.max_refusal_hold_s)
        self._next_refusal = turn + self.refusal_interval_s
        return turn - now


def _header_bytes(scope) -> int:
    return sum(len(name) + len(value) for name, value in scope["headers"])


def _unbounded_body(scope, max_body_bytes: int) -> bool:
    """Whether an unread body could go on for ever, so that the refusal must close the connection. An unread
    body of a declared length within the limit is discarded by the server's parser and the connection kept."""
    declared = header(scope, b"content-length")
    if declared is None:
        return header(scope, b"transfer-encoding") is not None
    return not declared.isdigit() or int(declared) > max_body_bytes


async def run_until(deadline: float, coroutine):
    """Await ``coroutine`` and return its result, cancelled with TimeoutError at ``deadline`` (``time.monotonic()``)."""
    loop = asyncio.get_running_loop()
    when = loop.time() + (deadline - time.monotonic())
    if hasattr(asyncio, "timeout_at"):  # Python 3.11+: no extra task per request
        async with asyncio.timeout_at(when):
            return await coroutine
    try:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(coroutine, max(0.0, when - loop.time()))
    except asyncio.TimeoutError as error:  # pragma: no cover
        raise TimeoutError from error

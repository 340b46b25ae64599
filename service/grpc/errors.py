"""dynfuse's errors as gRPC status codes. An ``ApiError`` carries the HTTP status of the same mistake; this is
its gRPC spelling, so a client's code reads the same outcome over either transport:

| HTTP | gRPC |
|---|---|
| 400, 415, 422 (a bad request) | INVALID_ARGUMENT |
| 400 for a model version that does not verify or warm up | FAILED_PRECONDITION (the version served keeps serving) |
| 401 (missing or wrong key) | UNAUTHENTICATED |
| 403 (control refused) | PERMISSION_DENIED |
| 404 (unknown model or version) | NOT_FOUND |
| 409 (a load or unload superseded by a later one, on another worker) | ABORTED |
| 413, 431 (over a limit) | RESOURCE_EXHAUSTED |
| 503 overloaded (over capacity, queue full) | RESOURCE_EXHAUSTED, with ``retry-after`` trailing metadata |
| 503 not ready (loading, shutting down) | UNAVAILABLE, with ``retry-after`` |
| 408, 504 (the deadline passed) | DEADLINE_EXCEEDED |

Anything else a client could not cause: INTERNAL, "internal server error" (logged with its traceback).
"""

from __future__ import annotations

import grpc

from service.errors import ApiError, LoadRefused, Overloaded

BY_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,  # Superseded: a concurrency conflict, gRPC's own words for it
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(error: ApiError) -> grpc.StatusCode:
    if isinstance(error, Overloaded):  # the server's capacity, not its health: retry later, elsewhere
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, LoadRefused):
        return grpc.StatusCode.FAILED_PRECONDITION
    code = BY_STATUS.get(error.status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= error.status < 500 else grpc.StatusCode.UNAVAILABLE


def trailing_metadata(error: ApiError) -> tuple[tuple[str, str], ...]:
    """HTTP's Retry-After as gRPC metadata (``retry-after``: seconds), for the refusals that have one."""
    retry_after = error.headers.get("Retry-After")
    return () if retry_after is None else (("retry-after", retry_after),)

"""One listening socket per worker process, so that the kernel spreads connections over the workers.

uvicorn's ``--workers N`` binds one socket in the supervisor and every worker accepts from it. Each worker's
event loop accepts every connection waiting when it wakes, so a client that opens a few keep-alive connections at
once (a load generator, a proxy's upstream pool) often has all of them taken by one worker while the other cores
idle: with two workers and ``wrk -c8``, one worker did at least 90% of the work in 7 runs of 8, at half the
throughput (``python -m bench.worker_spread``; bench/BENCHMARKS.md §8, 2026-12-04).

Here every worker listens on a socket of its own, bound to the same address with SO_REUSEPORT, and the kernel hands
each new connection to one of them by a hash of its addresses: independently per connection, as nginx's
``reuseport`` does. The supervisor keeps one more socket bound to the address, never listening (so it is handed no
connection): the port stays this server's while a worker is replaced, and port 0 resolves once for all workers.
"""

from __future__ import annotations

import logging
import socket
import sys

from uvicorn.config import STARTUP_FAILURE

logger = logging.getLogger("dynfuse")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening (uvicorn's server listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _bind_in_worker(host: str, port: int) -> socket.socket:
    """What a ``WorkerListener`` becomes in the worker process. A port it cannot bind fails the worker's start, which
    uvicorn's supervisor takes as the end of the server (not a crash to restart)."""
    try:
        return reuse_port_socket(host, port)
    except OSError as error:
        logger.error("cannot listen on %s:%d: %s", host, port, error.strerror or error)
        sys.exit(STARTUP_FAILURE)


class WorkerListener:
    """Stands in for the listening socket uvicorn's supervisor hands to each worker it starts (and restarts): the
    worker process unpickles it as a socket of its own, bound to the same address with SO_REUSEPORT."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port

    def __reduce__(self):
        return _bind_in_worker, (self.host, self.port)


class ReservedPort:
    """The supervisor's socket on (host, port), bound with SO_REUSEPORT and never listening: it keeps the port this
    server's while workers come and go, and tells the port that port 0 picked. A context manager."""

    def __init__(self, host: str, port: int):
        self.socket = reuse_port_socket(host, port)
        self.host = host
        self.port = self.socket.getsockname()[1]

    def listener(self) -> WorkerListener:
        return WorkerListener(self.host, self.port)

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(self, *_) -> None:
        self.socket.close()

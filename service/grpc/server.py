"""The gRPC server beside the HTTP one: grpcio's asyncio server on the app's event loop, started and stopped by the
app's lifespan (service/main.py), so both serve one model repository, one batcher per model, one admission.

- Messages larger than DYNFUSE_MAX_BODY_BYTES are refused by gRPC itself (RESOURCE_EXHAUSTED), the limit an HTTP
  body has; gRPC checks it on the decompressed message too.
- Shutdown: on SIGTERM or SIGINT (while uvicorn stops accepting HTTP connections) gRPC refuses new calls and lets
  the calls in flight finish, for at most the request deadline (DYNFUSE_REQUEST_TIMEOUT_S) and a second: by then
  every inference call has been answered or cut by its deadline. The lifespan's end waits for it before the
  batchers stop.
- With ``--workers N`` every worker process binds the port with SO_REUSEPORT and the kernel hands each new
  connection to one of them. A gRPC channel is one connection that lasts, so one channel's calls all go to one
  worker: spread a client's load over several channels. One process binds without SO_REUSEPORT, so that a port
  already in use is an error at start instead of a silent share with another server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

import grpc

from service.grpc.servicer import InferenceServicer, add_to_server

logger = logging.getLogger("dynfuse")


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    def __init__(self, app):
        settings = app.state.settings
        self.app = app
        self.host = settings.host
        self.requested_port = settings.grpc_port
        self.port: int | None = None  # the port bound, once started (DYNFUSE_GRPC_PORT=0 picks one)
        self.grace_s = settings.request_timeout_s + 1.0
        self.options = [
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0 if settings.workers == 1 else 1),  # 0 workers: one per core, several
        ]
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        server = grpc.aio.server(options=self.options)
        add_to_server(InferenceServicer(self.app), server)
        try:
            self.port = server.add_insecure_port(address(self.host, self.requested_port))
        except RuntimeError as error:  # grpcio's words for a port in use
            raise OSError(
                f"cannot serve gRPC on {address(self.host, self.requested_port)} (DYNFUSE_GRPC_PORT): {error}"
            ) from None
        await server.start()
        self._server = server
        self._stop_on_signals()
        logger.info("gRPC (Open Inference Protocol) on %s", address(self.host, self.port))

    def begin_stop(self) -> asyncio.Future:
        """Refuse new calls now; the calls in flight finish within the grace period. Idempotent."""
        if self._stopping is None:
            if self._server is None:  # never started
                self._stopping = asyncio.get_running_loop().create_future()
                self._stopping.set_result(None)
            else:
                logger.info("gRPC: stopping (calls in flight have %.0f s)", self.grace_s)
                self._stopping = asyncio.ensure_future(self._server.stop(self.grace_s))
        return self._stopping

    async def stop(self) -> None:
        await self.begin_stop()

    def _stop_on_signals(self) -> None:
        """Begin the stop when uvicorn begins its own: chain to the handlers it installed for SIGTERM and SIGINT
        (only the main thread may; an app under a test client runs in another and is stopped by its lifespan)."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = self._loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def chained(received, frame, previous=previous):
                loop.call_soon_threadsafe(self.begin_stop)
                previous(received, frame)

            signal.signal(signum, chained)

"""``inference.GRPCInferenceService``: the Open Inference Protocol over gRPC, on the app's own state (its model
repository, batchers, admission and metrics), so a gRPC request is served exactly as the same request over HTTP.

- Who may call what is HTTP's (service/auth.py), with the key as ``authorization: Bearer <key>`` metadata: health
  (ServerLive, ServerReady, ModelReady) and ServerMetadata are open; ModelMetadata, ModelConfig and ModelInfer need
  an inference key when any is configured; RepositoryIndex any valid key; RepositoryModelLoad and
  RepositoryModelUnload need DYNFUSE_MODEL_CONTROL=explicit and the admin key (PERMISSION_DENIED otherwise).
- ModelInfer goes through admission as an HTTP inference request does: refused at once while nothing is served
  (UNAVAILABLE) or when the capacity, shared with HTTP, is full (RESOURCE_EXHAUSTED); then it has a deadline, the
  sooner of the client's and DYNFUSE_REQUEST_TIMEOUT_S; it is counted in dynfuse_requests_total and timed in
  dynfuse_request_duration_seconds with ``protocol="grpc"`` and the name of its key.
- RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload: Triton's repository extension on the app's
  ModelRepository (service/grpc/repository.py), with HTTP's checks and keys.
- Not implemented: streaming inference, statistics (GET /metrics has them), shared memory, trace and log
  settings. They answer UNIMPLEMENTED with a message that says so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from service.admission import run_until
from service.api import v2_model
from service.errors import ApiError, DeadlineExceeded, InvalidInput, MalformedRequest, NotFound, PayloadTooLarge
from service.grpc import codec
from service.grpc import repository as repository_calls
from service.grpc.errors import status_code, trailing_metadata
from service.grpc.protocol import grpc_service_pb2 as pb
from service.grpc.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceServicer
from service.grpc.wire_limits import TooManyValues, check_wire_limits
from service.json_limits import JsonLimits
from service.metrics import ANONYMOUS

logger = logging.getLogger("dynfuse")

EXTENSIONS = ["parameters", "model_repository"]  # binary_tensor_data is HTTP's: gRPC's tensors are binary
CLIENT_CLOSED_REQUEST = 499  # the client cancelled (or its deadline passed first): as the HTTP metrics count it
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def add_to_server(servicer: InferenceServicer, server) -> None:
    """What the generated ``add_GRPCInferenceServiceServicer_to_server`` does, with two differences: a request that
    is not a valid message of its type is answered INVALID_ARGUMENT (grpcio's own deserializer would make it
    UNKNOWN, as if the server had failed), and one that holds more values than a call may is answered
    RESOURCE_EXHAUSTED before protobuf builds it (service/grpc/wire_limits.py)."""
    max_values = JsonLimits.for_rows(servicer.state.settings.max_batch_inputs).max_values  # HTTP's limit
    handlers = {}
    for method in SERVICE.methods:
        request_class, response_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        implementation = getattr(servicer, method.name)
        if method.client_streaming:
            make, behaviour = grpc.stream_stream_rpc_method_handler, implementation
        else:
            make, behaviour = grpc.unary_unary_rpc_method_handler, servicer.checked(method.name, implementation)
        handlers[method.name] = make(
            behaviour,
            request_deserializer=_lenient(request_class, max_values),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class Undecodable:
    """A request message that was not built: the handler answers with ``error`` (INVALID_ARGUMENT with the
    parser's reason, or RESOURCE_EXHAUSTED for one over the limits)."""

    def __init__(self, error: ApiError):
        self.error = error


def _lenient(message_class, max_values: int):
    descriptor = message_class.DESCRIPTOR

    def parse(data: bytes):
        try:
            check_wire_limits(data, descriptor, max_values)
            return message_class.FromString(data)
        except TooManyValues as error:
            return Undecodable(PayloadTooLarge(str(error)))
        except DecodeError as error:
            return Undecodable(MalformedRequest(f"the request is not a valid {descriptor.full_name} message ({error})"))

    return parse


class InferenceServicer(GRPCInferenceServiceServicer):
    def __init__(self, app):
        self.app = app  # the DynfuseApp: its state and its front door (admission)
        self.state = app.state

    # -- health and metadata -------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=v2_model.server_ready(self.state.repository))

    async def ModelReady(self, request, context):
        # A model or version not served is not ready (Triton's answer over gRPC; HTTP's is a 404, which
        # tritonclient.http reads as not ready too).
        try:
            ready = v2_model.model_ready(self.state.repository, request.name, request.version or None)
        except NotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=v2_model.SERVER_NAME, version=v2_model.SERVER_VERSION, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):
        async with _answering(context):
            self.state.access.check_inference(_authorization(context))
            with self._leased(request.name) as service:
                return codec.model_metadata(v2_model.describe(service, request.name, request.version or None))

    async def ModelConfig(self, request, context):
        async with _answering(context):
            self.state.access.check_inference(_authorization(context))
            with self._leased(request.name) as service:
                described = v2_model.describe(service, request.name, request.version or None)
                return codec.model_config(service, described)

    # -- inference -----------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        admission = self.app.front_door
        metrics = self.state.metrics
        access = self.state.access
        authorization = _authorization(context)
        key = (access.key_name(authorization) or ANONYMOUS) if access.keys_required else ANONYMOUS
        refusal = admission.admit()
        if refusal is not None:
            metrics.reject(refusal.reason)
            await admission.pace(refusal)
            metrics.count_request(refusal.status, time.perf_counter() - started, key, protocol="grpc")
            await _abort(context, refusal)
        status = 500  # what the metrics count if the handler dies before answering
        timeout_s = self.state.settings.request_timeout_s
        client_s = context.time_remaining()
        deadline = time.monotonic() + min(timeout_s, math.inf if client_s is None else max(0.0, client_s))
        counted = False

        def count(answer: _Answer | None = None) -> None:
            """Once per call, before the client can see how it ended."""
            nonlocal counted, status
            if counted:
                return
            counted = True
            if answer is not None and answer.error is not None:
                status = answer.error.status
                metrics.reject(answer.error.reason)
            metrics.count_request(status, time.perf_counter() - started, key, protocol="grpc")

        try:
            async with _answering(context, before_abort=count):
                try:
                    response, after_sent = await run_until(deadline, self._infer(request, key, deadline))
                except TimeoutError:
                    raise DeadlineExceeded(f"no answer within the request deadline of {timeout_s:g} s") from None
                status = 200
                context.add_done_callback(_once_sent(after_sent))  # audits: as HTTP's, once the answer is out
                return response
        except asyncio.CancelledError:
            # The client went away, or its deadline passed before ours: nobody reads an answer.
            late = time.monotonic() >= deadline
            status = 504 if late else CLIENT_CLOSED_REQUEST
            metrics.reject("deadline" if late else "client_disconnect")
            raise
        finally:
            admission.release()
            count()

    async def _infer(self, request, key: str, deadline: float):
        if key == ANONYMOUS and self.state.access.keys_required:  # no valid key (the name was looked up above)
            self.state.access.check_inference(None)  # raises Unauthorized
        if not request.model_name:
            raise InvalidInput(f"model_name is empty: name the model (this server serves {self._served()})")
        with self._leased(request.model_name) as service:
            v2_model.check_model(service, request.model_name, request.model_version or None)
            parameters = codec.parameters(request.parameters, "request")
            outputs = codec.selected_outputs(request, parameters)
            tensors = codec.input_tensors(request)
            values, after_sent = await v2_model.infer(service, self.state.settings, parameters, tensors, deadline)
            return codec.infer_response(service, request.id, outputs, values), after_sent

    # -- the model repository ------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        async with _answering(context):
            self.state.access.check_index(_authorization(context))
            return repository_calls.index(self.state.repository, request)

    async def RepositoryModelLoad(self, request, context):
        async with _answering(context):
            self.state.access.check_control(_authorization(context), "loads")
            return await repository_calls.load(self.state.repository, request)

    async def RepositoryModelUnload(self, request, context):
        async with _answering(context):
            self.state.access.check_control(_authorization(context), "unloads")
            return await repository_calls.unload(self.state.repository, request)

    # -- not implemented -----------------------------------------------------------------------
    async def ModelStreamInfer(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "dynfuse does not serve streaming inference: use ModelInfer")

    async def ModelStatistics(self, request, context):
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "dynfuse keeps its statistics as Prometheus metrics: GET /metrics"
        )

    async def _shared_memory(self, request, context):
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "the shared memory extension is not supported; send the data in the request"
        )

    SystemSharedMemoryStatus = SystemSharedMemoryRegister = SystemSharedMemoryUnregister = _shared_memory
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _shared_memory

    async def TraceSetting(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "dynfuse has no trace settings")

    async def LogSettings(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "dynfuse's log level is DYNFUSE_LOG_LEVEL, set at start")

    # -- helpers -------------------------------------------------------------------------------
    def checked(self, name: str, implementation):
        """``implementation``, except for a request that was not built (it did not parse, or is over the limits)."""

        async def behaviour(request, context):
            if isinstance(request, Undecodable):
                error = request.error
                if name == "ModelInfer":  # counted as HTTP counts a body that is not JSON, or over its limits
                    self.state.metrics.reject(error.reason)
                    self.state.metrics.count_request(error.status, 0.0, protocol="grpc")
                await _abort(context, error)  # raises: the call ends here
            return await implementation(request, context)

        return behaviour

    def _leased(self, name: str):
        """The served version of ``name``, held (as an HTTP request holds it) until the block ends."""
        return _Lease(self.state.repository, name)

    def _served(self) -> str:
        return ", ".join(map(repr, sorted(self.state.repository.models))) or "none yet"


def _once_sent(after_sent):
    """A done callback of the call: ``after_sent`` once the answer has gone out (not when the client went away
    first: nobody got that answer, as HTTP runs a response's background task only once it is sent)."""

    def done(context) -> None:
        if context.cancelled():
            return
        try:
            after_sent()
        except Exception:
            logger.exception("the work after a gRPC answer (its audits) failed")

    return done


def _authorization(context) -> str | bytes | None:
    """The ``authorization`` metadata of the call, as sent (service/auth.py reads it as HTTP's header)."""
    return next((value for key, value in context.invocation_metadata() or () if key == "authorization"), None)


class _Lease:
    def __init__(self, repository, name: str):
        self.leases = repository.leases()
        self.name = name

    def __enter__(self):
        try:
            return self.leases.get(self.name)
        except BaseException:
            self.leases.release()
            raise

    def __exit__(self, *exc) -> None:
        self.leases.release()


class _Answer:
    error: ApiError | None = None


@asynccontextmanager
async def _answering(context, before_abort: Callable[[_Answer], None] | None = None):
    """ApiErrors raised in the block end the RPC with their gRPC status; anything else with INTERNAL (logged).
    ``before_abort`` sees the answer first: ``context.abort`` sends the status before it raises, so whatever must be
    done before the client can see the error (the metrics it may read next) is done there."""
    answer = _Answer()
    try:
        yield answer
    except ApiError as error:
        answer.error = v2_model.as_v2(error)  # the protocol's status, which the metrics count
        if before_abort is not None:
            before_abort(answer)
        await _abort(context, error)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception:
        logger.exception("unhandled error in a gRPC call")
        if before_abort is not None:
            before_abort(answer)
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")


async def _abort(context, error: ApiError) -> None:
    await context.abort(status_code(error), error.message, trailing_metadata(error))

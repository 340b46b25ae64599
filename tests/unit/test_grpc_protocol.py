"""The gRPC protocol files: the checked-in modules are what the checked-in .proto files generate; their descriptors
are Triton's own, byte for byte (tritonclient's, an independent copy); every message KServe's client sends or reads
has the same fields and numbers here; and each dynfuse error has the gRPC status code the API promises."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import grpc
import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from service import errors
from service.grpc.errors import status_code, trailing_metadata
from service.grpc.protocol import generate
from service.grpc.protocol import grpc_service_pb2 as ours
from service.grpc.protocol import model_config_pb2 as ours_config


def test_the_checked_in_modules_are_what_the_protos_generate():
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the dev extra")
    assert generate.check() == [], "run: python -m service.grpc.protocol.generate"


def test_the_descriptors_are_tritons_byte_for_byte():
    assert ours.DESCRIPTOR.serialized_pb == triton_service.DESCRIPTOR.serialized_pb
    assert ours_config.DESCRIPTOR.serialized_pb == triton_config.DESCRIPTOR.serialized_pb
    # So one process holds both (a test, or an application using tritonclient beside dynfuse).
    assert ours.ModelInferRequest.DESCRIPTOR is triton_service.ModelInferRequest.DESCRIPTOR


# KServe's generated module declares the same protobuf names (inference.*) from another file, so one process's
# descriptor pool can't hold it beside Triton's: it is read in a process of its own.
KSERVE_DESCRIPTOR = """
import sys
from google.protobuf import descriptor_pb2
from kserve.protocol.grpc import grpc_predict_v2_pb2
proto = descriptor_pb2.FileDescriptorProto()
grpc_predict_v2_pb2.DESCRIPTOR.CopyToProto(proto)
sys.stdout.buffer.write(proto.SerializeToString())
"""


STRING, BOOL, OPTIONAL = 9, 8, 1
KSERVE_OWN = {  # field 1 is Triton's repository_name; Triton's responses are empty
    "RepositoryModelLoadRequest": {"model_name": (1, STRING, OPTIONAL, "")},
    "RepositoryModelUnloadRequest": {"model_name": (1, STRING, OPTIONAL, "")},
    "RepositoryModelLoadResponse": {"model_name": (1, STRING, OPTIONAL, ""), "isLoaded": (2, BOOL, OPTIONAL, "")},
    "RepositoryModelUnloadResponse": {"model_name": (1, STRING, OPTIONAL, ""), "isUnloaded": (2, BOOL, OPTIONAL, "")},
}


def _fields(message) -> dict:
    fields = {f.name: (f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in message.field}
    for nested in message.nested_type:
        fields |= {f"{nested.name}.{k}": v for k, v in _fields(nested).items()}
    return fields


def test_every_message_and_call_of_kserves_protocol_is_here_with_the_same_fields():
    if importlib.util.find_spec("kserve") is None:  # not imported here: see above
        pytest.skip("kserve is in the dev extra")
    raw = subprocess.run([sys.executable, "-c", KSERVE_DESCRIPTOR], capture_output=True, check=True, timeout=120)
    kserve = descriptor_pb2.FileDescriptorProto.FromString(raw.stdout)
    triton = descriptor_pb2.FileDescriptorProto()
    ours.DESCRIPTOR.CopyToProto(triton)
    assert kserve.package == triton.package == "inference"
    here = {message.name: message for message in triton.message_type}
    assert len(kserve.message_type) >= 16
    for message in kserve.message_type:
        assert message.name in here, message.name
        if message.name in KSERVE_OWN:
            # KServe's repository messages differ from Triton's: the server reads and writes both
            # (tests/integration/test_grpc_repository.py sends KServe's).
            assert _fields(message) == KSERVE_OWN[message.name], message.name
            continue
        assert _fields(message).items() <= _fields(here[message.name]).items(), message.name
    [kserve_service], [triton_service_] = kserve.service, triton.service
    assert kserve_service.name == triton_service_.name == "GRPCInferenceService"
    calls = {m.name: (m.input_type, m.output_type) for m in triton_service_.method}
    for method in kserve_service.method:
        assert calls[method.name] == (method.input_type, method.output_type), method.name


# The API's table (docs and service/grpc/errors.py), written out here as the expected answer.
EXPECTED = [
    (errors.MalformedRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnsupportedMediaType("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.LoadRefused("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthorized("x"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.Forbidden("x"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.Superseded("x"), grpc.StatusCode.ABORTED),
    (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errors.PayloadTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.HeadersTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Overloaded("x", 1), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.OverCapacity("x", 1), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotReady("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.RequestTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
]


@pytest.mark.parametrize(("error", "code"), EXPECTED, ids=lambda v: type(v).__name__)
def test_each_error_has_its_status_code(error, code):
    assert status_code(error) == code


def test_every_client_error_class_is_mapped_and_none_is_internal():
    mapped = {type(error) for error, _ in EXPECTED}
    defined = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.ApiError)}
    assert defined - {errors.ApiError} <= mapped, "a new ApiError needs its gRPC code in the table"
    assert {code for _, code in EXPECTED}.isdisjoint({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


def test_retry_after_travels_as_trailing_metadata():
    assert trailing_metadata(errors.OverCapacity("x", 3)) == (("retry-after", "3"),)
    assert trailing_metadata(errors.NotReady("x")) == (("retry-after", "1"),)
    assert trailing_metadata(errors.InvalidInput("x")) == ()

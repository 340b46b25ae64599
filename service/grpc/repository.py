"""Triton's model repository extension over gRPC (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload), on
the app's own ModelRepository, with the checks of the HTTP routes (service/api/routes/repository.py):

- the index lists every model of the store (and every served one) with its state; one entry per model, as over
  HTTP (gRPC's ModelIndex has no field for the versions the store holds: ``GET``-style detail is HTTP's);
- a load serves a version (``parameters["version"]``, a string or an int64; default the highest in the store),
  verified and warmed beside the one served; an unload stops serving a model once its requests have finished.

KServe's protocol declares these two calls with other messages than Triton's: its request's field 1 is the model
name (Triton's ``repository_name``), and its responses carry the model name (1) and ``isLoaded``/``isUnloaded``
(2), where Triton's are empty. So a request with only field 1 set names the model, and each response also carries
KServe's two fields: Triton's clients skip fields their message does not declare.
"""

from __future__ import annotations

from service.errors import InvalidInput
from service.grpc.codec import parameters
from service.grpc.protocol import grpc_service_pb2 as pb
from service.repository import ModelRepository, check_unload_parameters, load_version


def index(repository: ModelRepository, request) -> pb.RepositoryIndexResponse:
    _check_repository(request.repository_name)
    entries = repository.index(ready_only=request.ready)
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e["name"], version=e["version"], state=e["state"], reason=e["reason"]
            )  # fmt: skip
            for e in entries
        ]
    )


async def load(repository: ModelRepository, request) -> pb.RepositoryModelLoadResponse:
    name = _model_name(request)
    version = load_version(parameters(request.parameters, "load"))
    result = await repository.load(name, version)
    return pb.RepositoryModelLoadResponse.FromString(_kserve_answer(result.name, True))


async def unload(repository: ModelRepository, request) -> pb.RepositoryModelUnloadResponse:
    name = _model_name(request)
    check_unload_parameters(parameters(request.parameters, "unload"))
    await repository.unload(name)
    return pb.RepositoryModelUnloadResponse.FromString(_kserve_answer(name, True))


def _model_name(request) -> str:
    if not request.model_name:  # KServe's field 1, or nothing at all
        if not request.repository_name:
            raise InvalidInput("model_name is empty: name the model to load or unload")
        return request.repository_name
    _check_repository(request.repository_name)
    return request.model_name


def _check_repository(repository_name: str) -> None:
    if repository_name:
        raise InvalidInput(
            f"repository_name {repository_name!r}: dynfuse serves one model store (DYNFUSE_STORE); leave it empty"
        )


def _kserve_answer(model_name: str, done: bool) -> bytes:
    """KServe's response fields, as protobuf's wire format: 1 the model name (a string), 2 a bool."""
    name = model_name.encode()
    return b"\x0a" + _varint(len(name)) + name + b"\x10" + (b"\x01" if done else b"\x00")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)

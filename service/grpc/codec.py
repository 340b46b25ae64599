"""The gRPC wire format of the Open Inference Protocol, to and from what ``service/api/v2_model.py`` reads and
writes (the same objects the HTTP binding makes from JSON and binary tensor data).

- Inputs: a BYTES tensor's elements come either in ``raw_input_contents`` (one entry per input, in input order:
  each element a 4-byte little-endian length then its bytes, as tritonclient.grpc sends them) or in
  ``contents.bytes_contents`` (one entry per element, as KServe's client may send them); not both. An image element
  is the image file's bytes, a text element UTF-8. An input's one parameter is ``binary_data_size``, which KServe's
  client sends beside raw contents: it must be their length.
- Outputs: always in ``raw_output_contents`` (Triton's choice, which every client reads), in output order.
- Parameters: the ``InferParameter`` oneof's value (bool, int64, string, double, uint64) as the Python value the
  HTTP binding gets from JSON, so one check reads both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import partial

from service.api import v2_model
from service.api.v2_codec import check_parameters, encode_output, requested_outputs, split_bytes
from service.api.v2_model import OUTPUT_DATATYPES, InputTensor
from service.errors import MalformedRequest
from service.grpc.protocol import grpc_service_pb2 as pb
from service.grpc.protocol import model_config_pb2 as config_pb
from service.inference import InferenceService

CONFIG_TYPES = {
    "BYTES": config_pb.TYPE_STRING,
    "FP32": config_pb.TYPE_FP32,
    "INT64": config_pb.TYPE_INT64,
    "BOOL": config_pb.TYPE_BOOL,
}


def parameters(fields: Mapping, where: str) -> dict:
    """A ``map<string, InferParameter>`` (or ModelRepositoryParameter) as {name: value}."""
    values = {}
    for name, parameter in fields.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is None:
            raise MalformedRequest(f"{where} parameter {name!r} has no value: set one of its *_param fields")
        values[name] = getattr(parameter, which)
    return values


def input_tensors(request: pb.ModelInferRequest) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise MalformedRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send one per input, in "
            "input order, or none and each input's contents"
        )
    tensors = []
    for index, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        given = parameters(tensor.parameters, where)
        check_parameters(where, given, {"binary_data_size"})
        size = given.get("binary_data_size")  # KServe's client sends it with raw contents; it must agree
        if size is not None and (not raw or isinstance(size, bool) or size != len(raw[index])):
            held = f"{len(raw[index])} bytes of raw_input_contents" if raw else "no raw_input_contents"
            raise MalformedRequest(f"{where}: binary_data_size is {size!r} but it has {held}")
        elements = partial(_elements, tensor, raw[index] if raw else None)
        tensors.append(InputTensor(tensor.name, tensor.datatype, tensor.shape, elements))
    return tensors


def _elements(tensor, raw: bytes | None) -> list[bytes]:
    """The elements of a tensor whose shape v2_model has checked ([N], N within the rows limit): at most N + 1 of
    them are made, so that a shape that lies costs no more than one that does not (a raw content of 10 MiB of
    4-byte empty elements would otherwise be 2.6 million of them)."""
    expected = math.prod(tensor.shape)
    if raw is None:
        contents = tensor.contents.bytes_contents
        return list(contents if len(contents) <= expected else contents[: expected + 1])
    if tensor.HasField("contents") and tensor.contents.ByteSize():
        raise MalformedRequest(f"input {tensor.name!r}: send its contents or raw_input_contents, not both")
    return split_bytes(raw, tensor.name, limit=expected + 1)


def selected_outputs(request: pb.ModelInferRequest, request_parameters: dict) -> list[str]:
    """The outputs to send, in order: those requested (no output parameter is supported), or all of them (``shapley``
    only with the request parameter ``explain``)."""
    requested = None
    if request.outputs:
        requested = [(o.name, parameters(o.parameters, f"output {o.name!r}")) for o in request.outputs]
    available = v2_model.available_outputs(request_parameters, [o.name for o in request.outputs])
    return [name for name, _ in requested_outputs(requested, available, set())]


def infer_response(service: InferenceService, request_id: str, outputs: list[str], values: dict):
    response = pb.ModelInferResponse(model_name=service.model.name, model_version=service.model.version, id=request_id)
    for name in outputs:
        tensor, raw = encode_output(name, OUTPUT_DATATYPES[name], values[name], binary=True)
        response.outputs.add(name=name, datatype=tensor["datatype"], shape=tensor["shape"])
        response.raw_output_contents.append(raw)
    return response


def model_metadata(described: dict) -> pb.ModelMetadataResponse:
    """v2_model.describe's metadata; the labels (beyond the protocol) are in ModelConfig's parameters."""
    return pb.ModelMetadataResponse(
        name=described["name"],
        versions=described["versions"],
        platform=described["platform"],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in described["inputs"]],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in described["outputs"]],
    )


def model_config(service: InferenceService, described: dict) -> pb.ModelConfigResponse:
    """Triton's model configuration, as far as it describes a dynfuse model: the tensors of the metadata (the
    batch axis spelled as -1, ``max_batch_size`` 0, as the metadata does) and, as string parameters, the labels in
    the order of the ``probabilities`` columns (a JSON list), the experts, the full expert and the routes."""
    model = service.model

    def tensor(kind, entry):
        return kind(name=entry["name"], data_type=CONFIG_TYPES[entry["datatype"]], dims=entry["shape"])

    extra = {
        "labels": json.dumps(list(model.labels)),
        "experts": json.dumps(list(service.pipeline.experts)),
        "full_expert": model.full_expert,
        "default_operating_point": service.default_point,
        "operating_points": json.dumps(list(model.operating_points)),
    }
    config = config_pb.ModelConfig(
        name=model.name,
        platform=v2_model.PLATFORM,
        backend=v2_model.PLATFORM,
        max_batch_size=0,
        input=[tensor(config_pb.ModelInput, entry) for entry in described["inputs"]],
        output=[tensor(config_pb.ModelOutput, entry) for entry in described["outputs"]],
        parameters={name: config_pb.ModelParameter(string_value=value) for name, value in extra.items()},
    )
    return pb.ModelConfigResponse(config=config)

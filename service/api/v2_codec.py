"""The Open Inference Protocol's wire format (KServe v2 REST) with Triton's binary tensor data extension.

Model-agnostic: the protocol's JSON objects as pydantic models (they make the /docs page), the
request body split into its JSON header and the binary tensor data after it, BYTES tensors (each
element a 4-byte little-endian length, then its bytes), numeric tensors (raw little-endian, row
major), output selection, and the response: JSON ``data``, or bytes after the JSON with
``Inference-Header-Content-Length`` when any output is binary.

Every client mistake raises an ``ApiError``: 400 malformed, 413 over a limit, 415 unsupported
encoding (the /v2 routes answer that one with 400 too).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi.responses import Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    WrapValidator,
)

from service.errors import MalformedRequest, PayloadTooLarge, UnsupportedMediaType, describe_validation_errors
from service.json_limits import JsonLimits, check_json_limits

HEADER_LENGTH = "Inference-Header-Content-Length"
# The non-BYTES datatypes this server sends, little-endian (BOOL: one byte per element, 0 or 1, as the protocol says).
NUMPY_DTYPES = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}


def _scalar(value, handler):
    """One message instead of one per member of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("a parameter's value is a string, a number or a boolean") from None


Parameters = dict[str, Annotated[StrictStr | StrictBool | StrictInt | StrictFloat, WrapValidator(_scalar)]]


def _whole_number(value):
    """JSON Schema's ``integer`` is any number with no fractional part: ``1.0`` and ``1e0`` are integers too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Dimension = Annotated[StrictInt, BeforeValidator(_whole_number), Field(ge=0)]


# -- the protocol's JSON objects ---------------------------------------------------------------
class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="The input's name, as the model metadata lists it.")
    shape: list[Dimension] = Field(..., description="The tensor's shape, batch axis first: a list of integers.")
    datatype: str = Field(..., description="The element type, e.g. BYTES, FP32, INT64.")
    parameters: Parameters = Field(
        default_factory=dict,
        description="binary_data_size: the byte size of this tensor's binary data after the JSON (binary "
        "tensor data extension); leave 'data' out then.",
    )
    data: list[Any] | None = Field(
        None, description="The elements, row-major, flat or nested. BYTES elements are strings."
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="An output's name, as the model metadata lists it.")
    parameters: Parameters = Field(
        default_factory=dict,
        description="binary_data: true to get this output as binary data after the JSON (overrides the "
        "request's binary_data_output).",
    )


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: Parameters = Field(
        default_factory=dict,
        description="Request parameters. binary_data_output: true to get every output as binary data by default.",
    )
    inputs: list[RequestInput] = Field(..., description="The input tensors.")
    outputs: list[RequestOutput] | None = Field(
        None, description="The outputs to return, in this order; default: all, as JSON unless binary_data_output."
    )
    model_name: str | None = Field(None, description="Ignored (some clients send it): the URL names the model.")
    model_version: str | None = Field(None, description="Ignored: the URL names the version.")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int] = Field(..., description="Batch axis first.")
    datatype: str
    parameters: Parameters | None = Field(
        None, description="binary_data_size when the output is sent as binary data after the JSON."
    )
    data: list[Any] | None = Field(None, description="Row-major, flat; absent when the output is binary.")


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = Field(None, description="The request's id, when it had one.")
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(..., description="-1 marks a variable dimension (the batch axis).")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(..., description="The protocol extensions this server supports.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(..., description="The versions that may be named in the URL.")
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    labels: list[str] = Field(
        ..., description="Beyond the protocol: the class names, in the order of the 'probabilities' columns."
    )


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool
    reason: str | None = Field(None, description="Beyond the protocol: why the model is not ready, when it is not.")


class ErrorV2(BaseModel):
    error: str = Field(..., description="What went wrong and what to fix.")


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its ``$defs`` substituted in place: an operation's request body in
    ``openapi_extra`` can't carry definitions of its own, and ``#/$defs/...`` would point nowhere."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


# -- reading a request ---------------------------------------------------------------------------
@dataclass
class DecodedRequest:
    request: InferenceRequest
    binary: list[bytes | None]  # per input, in order: its binary data, or None when it came as JSON data


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent before compression (tritonclient's request_compression_algorithm), at most ``max_bytes``:
    the body limit bounds what the client sends, this bounds what it expands to."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    window = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if window is None:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none")
    decompressor = zlib.decompressobj(window)
    try:
        plain = decompressor.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise MalformedRequest(f"the body is not valid {encoding} data ({error})") from None
    if len(plain) > max_bytes:
        raise PayloadTooLarge(f"the {encoding} body expands to over the limit of {max_bytes:,} bytes")
    if not decompressor.eof:
        raise MalformedRequest(f"the {encoding} body is truncated")
    return plain


def parse_request(body: bytes, header_length: str | None, limits: JsonLimits) -> DecodedRequest:
    """The JSON inference request and, per input, the binary data that follows the JSON. The JSON is held to
    ``limits`` (413) before any object is built from it."""
    json_part, tail = _split(body, header_length)
    check_json_limits(json_part, limits)
    try:
        request = InferenceRequest.model_validate_json(json_part)
    except ValidationError as error:
        errors = error.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            if header_length is not None:
                hint = f" (check {HEADER_LENGTH}: the JSON's length in bytes)"
            elif "trailing" in errors[0]["msg"]:
                hint = f" (binary data after the JSON needs the {HEADER_LENGTH} header)"
            else:
                hint = ""
            reason = errors[0]["msg"].removeprefix("Invalid JSON: ")
            raise MalformedRequest(f"the request is not valid JSON: {reason}{hint}") from None
        raise MalformedRequest(f"invalid inference request: {describe_validation_errors(errors)}") from None
    return DecodedRequest(request, _take_binary(request.inputs, tail, header_length is not None))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit():
        raise MalformedRequest(f"{HEADER_LENGTH}: {header_length!r} is not a byte count")
    size = int(header_length)
    if not 0 < size <= len(body):
        raise MalformedRequest(
            f"{HEADER_LENGTH} is {size} but the body has {len(body)} bytes: it gives the length of the JSON "
            "that starts the body"
        )
    return body[:size], body[size:]


def _take_binary(inputs: list[RequestInput], tail: bytes, has_header: bool) -> list[bytes | None]:
    """Binary data follows the JSON in the order of the inputs that declare a binary_data_size."""
    offset = 0
    out: list[bytes | None] = []
    for tensor in inputs:
        check_parameters(f"input {tensor.name!r}", tensor.parameters, {"binary_data_size"})
        size = _whole_number(tensor.parameters.get("binary_data_size"))
        if size is None:
            out.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MalformedRequest(f"input {tensor.name!r}: binary_data_size must be a byte count, not {size!r}")
        if tensor.data is not None:
            raise MalformedRequest(f"input {tensor.name!r}: send 'data' or binary_data_size, not both")
        if not has_header:
            raise MalformedRequest(
                f"input {tensor.name!r} declares binary_data_size but the request has no {HEADER_LENGTH} header "
                "giving the length of the JSON before the binary data"
            )
        if offset + size > len(tail):
            raise MalformedRequest(
                f"input {tensor.name!r}: binary_data_size is {size} but only {len(tail) - offset} bytes of binary "
                "data remain after the JSON"
            )
        out.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise MalformedRequest(
            f"{len(tail) - offset} bytes after the JSON belong to no input: the inputs' binary_data_size values "
            f"must add up to the body's length minus {HEADER_LENGTH}"
        )
    return out


def check_parameters(where: str, parameters: dict, accepted: set[str]) -> None:
    unknown = sorted(set(parameters) - accepted)
    if not unknown:
        return
    if any(name.startswith("shared_memory") for name in unknown):
        raise MalformedRequest(f"{where}: the shared memory extension is not supported; send the data in the body")
    if "classification" in unknown:
        raise MalformedRequest(f"{where}: the classification extension is not supported; request the outputs")
    known = f"accepted: {', '.join(sorted(accepted))}" if accepted else "it takes none"
    raise MalformedRequest(f"{where}: unknown parameter(s) {', '.join(map(repr, unknown))}; {known}")


def bytes_elements(tensor: RequestInput, binary: bytes | None) -> list[str] | list[bytes]:
    """A BYTES input's elements, row-major: strings from JSON data, bytes from binary data."""
    expected = math.prod(tensor.shape)
    if binary is not None:
        # Split no further than the shape says (a body of 4-byte empty elements would otherwise be millions).
        elements: list = split_bytes(binary, tensor.name, limit=expected + 1)
    elif tensor.data is None:
        raise MalformedRequest(
            f"input {tensor.name!r} carries no data: send 'data', or binary_data_size and the bytes after the JSON"
        )
    else:
        elements = _flatten(tensor.data)
        wrong = next((e for e in elements if not isinstance(e, str)), None)
        if wrong is not None:
            raise MalformedRequest(
                f"input {tensor.name!r}: BYTES elements in JSON are strings, not {type(wrong).__name__} ({wrong!r})"
            )
    if len(elements) != expected:
        sent = f"more than {expected}" if len(elements) > expected else str(len(elements))
        raise MalformedRequest(
            f"input {tensor.name!r}: shape {tensor.shape} holds {expected} element(s) but {sent} were sent"
        )
    return elements


def _flatten(data: list) -> list:
    flat = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def split_bytes(raw: bytes, name: str, limit: int | None = None) -> list[bytes]:
    """A binary BYTES tensor: each element a 4-byte little-endian length, then that many bytes; at most ``limit``
    elements are split off (the caller tells a longer tensor by the count)."""
    elements = []
    offset = 0
    while offset < len(raw) and (limit is None or len(elements) < limit):
        if offset + 4 > len(raw):
            raise MalformedRequest(
                f"input {name!r}: the binary data ends inside the 4-byte length of element {len(elements)}"
            )
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise MalformedRequest(
                f"input {name!r}: element {len(elements)} declares {size} bytes but only {len(raw) - offset} "
                "remain; each BYTES element is a 4-byte little-endian length followed by that many bytes"
            )
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def select_outputs(request: InferenceRequest, available: list[str]) -> list[tuple[str, bool]]:
    """(output name, send as binary) in response order: the requested outputs, or all of them."""
    default = request.parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise MalformedRequest(f"parameter binary_data_output must be true or false, not {default!r}")
    requested = None if request.outputs is None else [(o.name, o.parameters) for o in request.outputs]
    selected = []
    for name, parameters in requested_outputs(requested, available, {"binary_data"}):
        binary = parameters.get("binary_data", default)
        if not isinstance(binary, bool):
            raise MalformedRequest(f"output {name!r}: binary_data must be true or false, not {binary!r}")
        selected.append((name, binary))
    return selected


def requested_outputs(
    requested: list[tuple[str, dict]] | None, available: list[str], accepted: set[str]
) -> list[tuple[str, dict]]:
    """(output name, its parameters) in response order: the requested outputs, checked, or all of them. Either
    transport's request names its outputs this way (HTTP's JSON, gRPC's InferRequestedOutputTensor)."""
    if requested is None:
        return [(name, {}) for name in available]
    seen: set[str] = set()
    for name, parameters in requested:
        if name not in available:
            raise MalformedRequest(f"unknown output {name!r}; this model has: {', '.join(available)}")
        if name in seen:
            raise MalformedRequest(f"output {name!r} is requested twice")
        check_parameters(f"output {name!r}", parameters, accepted)
        seen.add(name)
    return requested


# -- writing a response --------------------------------------------------------------------------
def encode_output(name: str, datatype: str, values, binary: bool) -> tuple[dict, bytes | None]:
    """One $response_output and, when binary, its bytes. BYTES values: a list of str (shape [N]);
    numeric values: an array of any shape."""
    if datatype == "BYTES":
        shape = [len(values)]
        raw = join_bytes([v.encode() for v in values]) if binary else None
        data = None if binary else list(values)
    else:
        array = np.ascontiguousarray(values, dtype=NUMPY_DTYPES[datatype])
        shape = list(array.shape)
        raw = array.tobytes() if binary else None
        # tolist() gives the exact float32 value as a double: a client casting back gets the same bits.
        data = None if binary else array.ravel().tolist()
    tensor: dict = {"name": name, "datatype": datatype, "shape": shape}
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = data
    return tensor, raw


def encode_response(header: dict, binary: list[bytes]) -> Response:
    """JSON alone, or the JSON then the outputs' binary data in output order (binary tensor extension)."""
    body = json.dumps(header, separators=(",", ":")).encode()
    if not binary:
        return Response(body, media_type="application/json")
    return Response(
        body + b"".join(binary),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(body))},
    )

"""service/grpc/wire_limits.py: messages built of many tiny values are refused on their bytes, in bounded time;
the requests real clients send pass; malformed bytes are left to protobuf's parser."""

from __future__ import annotations

import time

import pytest

from service.grpc.protocol import grpc_service_pb2 as pb
from service.grpc.wire_limits import SMALL_BYTES, TooManyValues, check_wire_limits
from service.json_limits import JsonLimits

REQUEST = pb.ModelInferRequest.DESCRIPTOR
MAX_VALUES = JsonLimits.for_rows(64).max_values  # what the server uses with the default 64 rows per call
TEN_MIB = 10 * 1024 * 1024


def _tag(field: int, wire: int) -> bytes:
    value, out = field << 3 | wire, bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _repeated_empty(field: int) -> bytes:
    """A ModelInferRequest of about 10 MiB: a model name, then the top-level length-delimited ``field`` repeated
    empty (an empty input, output, parameter entry or raw content: two bytes each)."""
    head = pb.ModelInferRequest(model_name="shapes").SerializeToString()
    element = _tag(field, 2) + b"\x00"
    return head + element * ((TEN_MIB - len(head)) // len(element))


def _tensor_bomb(**contents) -> bytes:
    request = pb.ModelInferRequest(model_name="shapes")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=contents.pop("shape", [1]))
    for name, values in contents.items():
        getattr(tensor.contents, name).extend(values)
    return request.SerializeToString()


BOMBS = {
    "empty inputs": lambda: _repeated_empty(5),
    "empty outputs": lambda: _repeated_empty(6),
    "empty parameters": lambda: _repeated_empty(4),
    "empty raw contents": lambda: _repeated_empty(7),
    "unknown field": lambda: _repeated_empty(99),
    "empty bytes_contents": lambda: _tensor_bomb(bytes_contents=[b""] * (TEN_MIB // 2 - 64)),
    "packed shape": lambda: _tensor_bomb(shape=[1] * (TEN_MIB - 64)),
    "packed int64_contents": lambda: _tensor_bomb(int64_contents=[1] * (TEN_MIB - 64)),
    "packed fp32_contents": lambda: _tensor_bomb(fp32_contents=[0.5] * (TEN_MIB // 4 - 64)),
}


@pytest.mark.parametrize("build", BOMBS.values(), ids=BOMBS.keys())
def test_a_message_of_millions_of_tiny_values_is_refused_in_bounded_time(build):
    data = build()
    assert len(data) > 9 * 1024 * 1024
    started = time.process_time()
    with pytest.raises(TooManyValues, match=f"more than {MAX_VALUES:,} values"):
        check_wire_limits(data, REQUEST, MAX_VALUES)
    assert time.process_time() - started < 0.5  # the walk stops at the first value past the limit


def test_the_limit_counts_every_field_of_every_message():
    # Past SMALL_BYTES (a long model name), with n empty outputs: 1 + n values at the top level.
    name = "m" * (SMALL_BYTES + 1)
    for outputs, refused in ((99, False), (100, True)):
        request = pb.ModelInferRequest(model_name=name)
        for _ in range(outputs):
            request.outputs.add()
        data = request.SerializeToString()
        if refused:
            with pytest.raises(TooManyValues):
                check_wire_limits(data, REQUEST, 100)
        else:
            check_wire_limits(data, REQUEST, 100)
    # One output of a name and a parameter: 1 + (1 + name 1 + entry 1 + key 1 + value 1 + its choice 1) = 7.
    request = pb.ModelInferRequest(model_name=name)
    request.outputs.add(name="label").parameters["classification"].int64_param = 1
    check_wire_limits(request.SerializeToString(), REQUEST, 7)
    with pytest.raises(TooManyValues):
        check_wire_limits(request.SerializeToString(), REQUEST, 6)


def _kserve_request(rows: int, image: bytes) -> bytes:
    request = pb.ModelInferRequest(model_name="shapes", id="kserve")
    request.parameters["route"].string_param = "auto"
    for name, element in (("image", image), ("text", b"a red circle")):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[rows])
        tensor.contents.bytes_contents.extend([element] * rows)
    for output in ("label", "probabilities", "expert", "decided_by", "importance", "madds", "saved_ratio"):
        request.outputs.add(name=output)
    return request.SerializeToString()


def _triton_request(rows: int, image: bytes) -> bytes:
    request = pb.ModelInferRequest(model_name="shapes")
    for name, element in (("image", image), ("text", b"a red circle")):
        request.inputs.add(name=name, datatype="BYTES", shape=[rows])
        request.raw_input_contents.append((len(element).to_bytes(4, "little") + element) * rows)
    return request.SerializeToString()


@pytest.mark.parametrize("build", [_kserve_request, _triton_request], ids=["kserve contents", "tritonclient raw"])
def test_a_call_of_the_most_rows_passes(build):
    data = build(64, b"\x89PNG" + bytes(4000))
    assert len(data) > SMALL_BYTES
    check_wire_limits(data, REQUEST, MAX_VALUES)


def test_malformed_bytes_are_left_to_the_parser():
    big = b"x" * (SMALL_BYTES + 10)
    named = pb.ModelInferRequest(model_name=big.decode()).SerializeToString()
    for data in (named[:-5], named + b"\xff" * 20, _tag(5, 2) + b"\xff\xff\xff\xff\x0f" + big, _tag(1, 7) + big):
        check_wire_limits(data, REQUEST, MAX_VALUES)  # no exception: FromString reports them

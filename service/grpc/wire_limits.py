"""What a gRPC request message may hold, checked on its wire bytes before protobuf builds it.

gRPC's own limit (``grpc.max_receive_message_length``, DYNFUSE_MAX_BODY_BYTES) bounds a message's bytes, not what
parsing it builds: protobuf makes one object per element of a repeated field, and an element may cost two bytes on
the wire. A 10 MiB ``ModelInferRequest`` of empty ``inputs`` is 5.2 million messages, 455 MiB and two seconds of
the event loop (the parse runs there, before any handler could count anything); the same bytes as empty
``bytes_contents`` elements, ``parameters`` entries or ``raw_input_contents`` cost 100-250 MiB, and a packed
``shape`` of one-byte varints 8 bytes of memory per byte sent. This is gRPC's side of what
``service/json_limits.py`` is for a JSON body.

So every request message is first walked here, tag by tag, in bounded work: each field of each (nested) message
counts as one value, a packed repeated scalar as many values as it may hold (its bytes, for varints), and the walk
stops at the first value past ``max_values`` with ``TooManyValues``. The limit is HTTP's (``JsonLimits.for_rows``:
8 per row a call may carry, DYNFUSE_MAX_BATCH_INPUTS, and 256 more): a call within it holds two input tensors of at
most that many elements each, a few outputs and parameters. Length-delimited payloads (an image's bytes, a
string) are skipped, one step each, so a request within the limits costs the walk plus its usual parse. A message
of at most ``SMALL_BYTES`` is not walked: every value takes at least a byte, so it builds at most that many
objects (well under a megabyte), and the common call (one row, one small image) pays nothing.

The walk is not a validator: at the first bytes that are not protobuf's wire format it stops and leaves the
message to the parser, which reports them.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)

# The fewest bytes one element of a packed repeated scalar takes: how many elements its bytes may hold.
_FIXED_WIDTH = {
    FieldDescriptor.TYPE_DOUBLE: 8,
    FieldDescriptor.TYPE_FIXED64: 8,
    FieldDescriptor.TYPE_SFIXED64: 8,
    FieldDescriptor.TYPE_FLOAT: 4,
    FieldDescriptor.TYPE_FIXED32: 4,
    FieldDescriptor.TYPE_SFIXED32: 4,
}
_LENGTH_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)

SMALL_BYTES = 16 * 1024

_layouts: dict[str, dict[int, object]] = {}


class TooManyValues(Exception):
    """The message holds more values than the limit; the message says how many are allowed and why."""


def check_wire_limits(data: bytes, descriptor: Descriptor, max_values: int) -> None:
    """Raise TooManyValues when the message ``data`` of type ``descriptor`` holds more than ``max_values`` values."""
    if len(data) <= SMALL_BYTES:
        return
    values = 0
    pos = 0
    stack = [(len(data), _layout(descriptor))]  # (where the message ends, its fields)
    while stack:
        end, layout = stack[-1]
        if pos >= end:
            stack.pop()
            continue
        tag, pos = _varint(data, pos, end)
        if tag is None:
            return
        values += 1
        if values > max_values:
            raise TooManyValues(_message(descriptor, max_values))
        wire = tag & 7
        if wire == _VARINT:
            _, pos = _varint(data, pos, end)
            if pos is None:
                return
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH:
            length, pos = _varint(data, pos, end)
            if length is None or pos + length > end:
                return
            field = layout.get(tag >> 3)
            if isinstance(field, dict):  # a message: walk its fields next
                stack.append((pos + length, field))
                continue
            if isinstance(field, int):  # a packed repeated scalar: as many values as its bytes may hold
                values += max(length // field, 1) - 1
                if values > max_values:
                    raise TooManyValues(_message(descriptor, max_values))
            pos += length
        elif wire not in (_START_GROUP, _END_GROUP):  # groups' fields are counted as they come
            return  # not the wire format: the parser says so


def _varint(data: bytes, pos: int, end: int) -> tuple[int | None, int | None]:
    result = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    return None, None


def _layout(descriptor: Descriptor) -> dict[int, object]:
    """Field number -> the nested message's layout (a dict), the fewest bytes per element of a packable repeated
    scalar (an int), or None (a string, bytes, or a scalar, skipped as its wire type says)."""
    layout = _layouts.get(descriptor.full_name)
    if layout is not None:
        return layout
    layout = _layouts[descriptor.full_name] = {}  # filled after it is registered: a message may contain itself
    for field in descriptor.fields:
        if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
            layout[field.number] = _layout(field.message_type)
        elif _is_repeated(field) and field.type not in _LENGTH_DELIMITED:
            layout[field.number] = _FIXED_WIDTH.get(field.type, 1)
        else:
            layout[field.number] = None
    return layout


def _is_repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29 (label is deprecated there)
    return is_repeated if isinstance(is_repeated, bool) else field.label == FieldDescriptor.LABEL_REPEATED


def _message(descriptor: Descriptor, max_values: int) -> str:
    return (
        f"the {descriptor.full_name} message holds more than {max_values:,} values (fields and tensor elements), "
        "this server's limit for a call of at most DYNFUSE_MAX_BATCH_INPUTS rows; send fewer rows per call"
    )

"""What a JSON body may hold, checked on its bytes before anything is built from it.

Parsing a JSON body into Python (or pydantic) objects costs far more than the body: a 9.5 MiB body of empty
objects (``{"inputs":[{},{},...]}``) is 3.3 million dicts, 1.5 GiB and seconds of the event loop before any
count could be checked. So every JSON body of this API is first scanned here, in bounded work: the scan walks
the structure (a string is skipped by searching for its closing quote with ``bytes.find``, numbers and whitespace
by C-level regular expressions, so a long string costs one call) and stops at the first value past a limit, with
a 413:

- no array holds more than ``max_items`` elements (every array of this API's requests is a batch's rows,
  a tensor's elements or its shape, all bounded by DYNFUSE_MAX_BATCH_INPUTS, or shorter lists);
- the whole body holds at most ``max_values`` values (objects, arrays and scalars; keys are not counted),
  which bounds objects with many keys and arrays of arrays, each within ``max_items``;
- nesting is at most ``max_depth`` deep.

The scan is not a validator: at the first byte that is not JSON it stops and leaves the message to the parser
that follows, which stops there too. A body within the limits therefore costs the scan plus the usual parse,
and one past them costs the scan up to the value past the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.errors import PayloadTooLarge

_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
_OPEN = {ord("["): ord("]"), ord("{"): ord("}")}
_COMMA, _COLON, _QUOTE, _BACKSLASH = ord(","), ord(":"), ord('"'), ord("\\")


@dataclass(frozen=True)
class JsonLimits:
    max_items: int  # elements of one array
    max_values: int  # values in the whole body
    max_depth: int = 32  # arrays and objects inside each other
    setting: str = "DYNFUSE_MAX_BATCH_INPUTS"  # what to raise to allow more, for the message

    @classmethod
    def for_rows(cls, max_rows: int) -> JsonLimits:
        """The limits of this API's request bodies when a call carries at most ``max_rows`` rows: a row of a
        batch call is at most an object of three values, a /v2 tensor holds one element per row, and the rest
        of a body is a handful of fields."""
        return cls(max_items=max_rows, max_values=8 * max_rows + 256)


class _Container:
    __slots__ = ("close", "items", "key", "is_object")

    def __init__(self, opener: int, key: str):
        self.close = _OPEN[opener]
        self.is_object = opener == ord("{")
        self.items = 0  # elements (array) or members (object) seen so far
        self.key = key  # where it is, for the message: the member name or the element index that holds it


def check_json_limits(body: bytes, limits: JsonLimits) -> None:
    """Raise PayloadTooLarge (413) at the first array, value count or nesting over ``limits``; return at the end
    of the body, or at the first byte that is not JSON (the parser that follows says what is wrong there)."""
    stack: list[_Container] = []
    values = 0
    end = len(body)
    position = _WHITESPACE.match(body, 0).end()
    key = ""
    while position < end:
        # -- one value at ``position`` ------------------------------------------------------
        values += 1
        if values > limits.max_values:
            raise PayloadTooLarge(
                f"the JSON body holds over {limits.max_values:,} values; a request of this server holds fewer "
                f"(each array at most {limits.max_items:,} elements: {limits.setting})"
            )
        byte = body[position]
        if byte in _OPEN:
            if len(stack) >= limits.max_depth:
                raise PayloadTooLarge(f"the JSON body nests deeper than {limits.max_depth} arrays and objects")
            container = _Container(byte, key)
            stack.append(container)
            position = _WHITESPACE.match(body, position + 1).end()
            if position < end and body[position] == container.close:  # empty: a value like any scalar
                stack.pop()
                position += 1
            else:
                if container.is_object:
                    position, key = _member_name(body, position)
                    if position < 0:
                        return
                else:
                    key = "[0]"
                container.items = 1
                _check_items(stack, limits)
                continue  # its first element or member value
        elif byte == _QUOTE:
            position = _string_end(body, position)
            if position < 0:
                return
        elif byte in _LITERALS:
            literal = _LITERALS[byte]
            if body[position : position + len(literal)] != literal:
                return
            position += len(literal)
        else:
            match = _NUMBER.match(body, position)
            if match is None or match.end() == position:
                return
            position = match.end()
        # -- after a value: a comma, or the end of the containers it closes ------------------
        while True:
            position = _WHITESPACE.match(body, position).end()
            if not stack:
                return  # the top-level value ended; anything after it is the parser's to refuse
            if position >= end:
                return
            container = stack[-1]
            byte = body[position]
            if byte == container.close:
                stack.pop()
                position += 1
                continue
            if byte != _COMMA:
                return
            position = _WHITESPACE.match(body, position + 1).end()
            container.items += 1
            if container.is_object:
                position, key = _member_name(body, position)
                if position < 0:
                    return
            else:
                key = f"[{container.items - 1}]"
            _check_items(stack, limits)
            break


def _member_name(body: bytes, position: int) -> tuple[int, str]:
    """After ``{`` or ``,`` in an object: the position of the member's value, and its name (-1: not JSON)."""
    if position >= len(body) or body[position] != _QUOTE:
        return -1, ""
    after = _string_end(body, position)
    if after < 0:
        return -1, ""
    name = body[position + 1 : after - 1][:64].decode("utf-8", "replace")
    position = _WHITESPACE.match(body, after).end()
    if position >= len(body) or body[position] != _COLON:
        return -1, ""
    return _WHITESPACE.match(body, position + 1).end(), name


def _string_end(body: bytes, position: int) -> int:
    """The position just after the string that opens at ``position`` (a quote), or -1 when it never closes: the
    first quote after it that is not escaped, that is, not preceded by an odd run of backslashes. Found with
    ``bytes.find`` (memchr): a regular expression walked a request's 12 KB base64 image at about 2 ns a byte,
    30 us of a single request's scan (bench/request_cost.py)."""
    end = body.find(b'"', position + 1)
    while end >= 0:
        backslashes = 0
        while body[end - 1 - backslashes] == _BACKSLASH:  # stops at the opening quote at the latest
            backslashes += 1
        if backslashes % 2 == 0:
            return end + 1
        end = body.find(b'"', end + 1)
    return -1


def _check_items(stack: list[_Container], limits: JsonLimits) -> None:
    container = stack[-1]
    if not container.is_object and container.items > limits.max_items:
        where = "".join(c.key if c.key.startswith("[") else f".{c.key}" for c in stack).lstrip(".") or "the body"
        raise PayloadTooLarge(
            f"{where}: over the limit of {limits.max_items:,} elements per array ({limits.setting}); "
            "send fewer per call"
        )

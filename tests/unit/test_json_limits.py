"""service/json_limits.py against a reference that walks the parsed document (json.loads): the scan refuses a
body exactly when the parsed document breaks a limit, and never raises anything else, whatever the bytes."""

from __future__ import annotations

import json
import random
import time

import pytest

from service.errors import PayloadTooLarge
from service.json_limits import JsonLimits, check_json_limits

LIMITS = JsonLimits(max_items=5, max_values=40, max_depth=4)


def breaks_limits(document, limits: JsonLimits) -> bool:
    """The reference: count on the parsed document."""
    values = 0

    def walk(node, depth: int) -> bool:
        nonlocal values
        values += 1
        if isinstance(node, (list, dict)):
            if depth >= limits.max_depth:
                return True
            children = node if isinstance(node, list) else list(node.values())
            if isinstance(node, list) and len(node) > limits.max_items:
                return True
            return any(walk(child, depth + 1) for child in children)
        return False

    broken = walk(document, 0)
    return broken or values > limits.max_values


def random_document(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 5 or roll < 0.35:
        return rng.choice([0, -1.5e-7, 12345678901234567890, True, False, None, "", 'q"uo\\te', "é🔑", "[{,:}]"])
    if roll < 0.7:
        return [random_document(rng, depth + 1) for _ in range(rng.randint(0, 7))]
    return {
        rng.choice(["a", "b\\", '"k"', "{", "é"]) + str(i): random_document(rng, depth + 1)
        for i in range(rng.randint(0, 6))
    }


def scan_refuses(body: bytes) -> bool:
    try:
        check_json_limits(body, LIMITS)
    except PayloadTooLarge:
        return True
    return False


def test_the_scan_agrees_with_the_parsed_document_on_random_documents():
    rng = random.Random(20)
    refused = 0
    for _ in range(4000):
        document = random_document(rng)
        body = json.dumps(document, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
        expected = breaks_limits(document, LIMITS)
        assert scan_refuses(body) == expected, body
        refused += expected
    assert 500 < refused < 3500  # both outcomes are exercised


def test_cut_or_corrupted_bodies_raise_nothing_but_a_413():
    rng = random.Random(7)
    for _ in range(3000):
        body = bytearray(json.dumps(random_document(rng)).encode())
        if body and rng.random() < 0.5:
            body[rng.randrange(len(body))] = rng.randrange(256)
        cut = bytes(body[: rng.randint(0, len(body))])
        scan_refuses(cut)  # returns or raises PayloadTooLarge; any other exception fails the test


def test_the_message_says_which_array_and_which_setting():
    body = json.dumps({"inputs": [{"name": "text", "data": ["x"] * 6}]}).encode()
    with pytest.raises(PayloadTooLarge, match=r"inputs\[0\]\.data: over the limit of 5 elements per array"):
        check_json_limits(body, LIMITS)
    with pytest.raises(PayloadTooLarge, match="DYNFUSE_MAX_BATCH_INPUTS"):
        check_json_limits(b"[" + b",".join([b"1"] * 6) + b"]", LIMITS)


def test_a_body_bomb_is_refused_after_the_first_elements_past_the_limit():
    """9.5 MiB of empty objects: refused after reading 65 of them, not 3.3 million."""
    count = (int(9.5 * (1 << 20)) - 12) // 3
    bomb = b'{"inputs":[' + b",".join([b"{}"] * count) + b"]}"
    started = time.thread_time()  # this thread's CPU time: what other processes on the machine do not change
    with pytest.raises(PayloadTooLarge, match="inputs: over the limit of 64"):
        check_json_limits(bomb, JsonLimits.for_rows(64))
    # Bounded work: under a millisecond of CPU, where scanning the whole body takes seconds.
    assert time.thread_time() - started < 0.5


def test_a_long_string_costs_one_regular_expression_call():
    image = '"' + "QUJD" * 2_000_000 + '\\"' * 1000 + '"'
    body = ('{"inputs":[{"image":' + image + "}]}").encode()
    started = time.perf_counter()
    check_json_limits(body, JsonLimits.for_rows(64))
    assert time.perf_counter() - started < 0.5


def test_the_limits_of_a_call_scale_with_its_rows():
    limits = JsonLimits.for_rows(64)
    batch = {"inputs": [{"id": str(i), "image": "AAAA", "text": "a"} for i in range(64)], "route": "auto"}
    check_json_limits(json.dumps(batch).encode(), limits)  # the largest valid batch call passes
    v2 = {
        "id": "x",
        "parameters": {"route": "auto", "threshold": 0.5, "binary_data_output": False},
        "inputs": [
            {"name": n, "shape": [64], "datatype": "BYTES", "data": ["x"] * 64, "parameters": {}}
            for n in ("image", "text")
        ],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in ("label", "expert", "madds")],
    }
    check_json_limits(json.dumps(v2).encode(), limits)  # and the largest /v2 call


def test_a_string_ends_at_its_first_unescaped_quote_as_the_grammar_says():
    """``_string_end`` (a memchr search) against JSON's string grammar written as a regular expression (what the
    scan used before): the same end, or none, on random bytes rich in quotes and backslashes."""
    import re

    from service.json_limits import _string_end

    grammar = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
    rng = random.Random(3)
    for _ in range(20000):
        body = b'"' + bytes(rng.choice(b'"\\\\\\a,[') for _ in range(rng.randint(0, 12)))
        match = grammar.match(body)
        assert _string_end(body, 0) == (match.end() if match else -1), body

"""service/api/answers.py: orjson's body where it says what Starlette's JSONResponse says, JSONResponse's elsewhere."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fastapi.responses import JSONResponse

from service.api.answers import AnswerResponse


def answer(**changes) -> dict:
    body = {
        "id": "é-1\n\u2028\x01",  # non-ASCII, a newline, a line separator, a control character
        "label": "red_circle",
        "scores": {"red_circle": 0.981234, "blue_square": 1e-07, "green": 0.018766},
        "route": {"expert": "text", "scores": {"text": 0.7, "mi2p": 0.3}, "degraded": False},
        "compute": {"madds": 9_095_616, "saved_ratio": 0.987654},
        "timing_ms": {"queue": 0.125, "inference": 3.5, "total": 1e16},
        "uncertain": False,
    }
    body.update(changes)
    return body


def test_an_answer_of_finite_numbers_is_orjsons_body_with_the_standard_values():
    body = AnswerResponse(answer()).body
    assert body != JSONResponse(answer()).body  # orjson wrote it: 1e-7 and 1e16, where json.dumps writes 1e-07, 1e+16
    assert json.loads(body) == json.loads(JSONResponse(answer()).body) == answer()
    assert b" " not in body.replace(b"\xe2\x80\xa8", b"")  # compact, as JSONResponse's separators


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinity_is_refused_as_jsonresponse_refuses_it(value):
    with pytest.raises(ValueError, match="Out of range float values"):
        JSONResponse(answer(scores={"red_circle": value}))
    with pytest.raises(ValueError, match="Out of range float values"):
        AnswerResponse(answer(scores={"red_circle": value}))


@pytest.mark.parametrize(
    "changes",
    [
        {"fallback_from": None},  # a real null
        {"label": "null"},  # the word inside a string
        {"scores": {"red_circle": np.float64(0.5)}},  # a value orjson leaves to the caller
        {"compute": {"madds": 2**70}},  # an integer over 64 bits
    ],
)
def test_what_orjson_cannot_tell_apart_or_encode_is_jsonresponses_body(changes):
    assert AnswerResponse(answer(**changes)).body == JSONResponse(answer(**changes)).body

"""``open_image`` checks a plain PNG from its IHDR without Pillow's open: every file gets the verdict (status, size,
format) and, decoded, the pixels that opening it with Pillow first gives. The reference is Pillow itself, the
way open_image used it for every file before: its open, then the same checks."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError
from test_decode import MAX_PIXELS, SIDE, encoded, mutations, picture

from models.preprocess import to_pixels
from service.decode import decode_image, open_image, plain_png_pixels
from service.errors import ApiError


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def after_ihdr(png: bytes, *chunks: bytes) -> bytes:
    return png[:33] + b"".join(chunks) + png[33:]


def with_ihdr(png: bytes, width: int, height: int) -> bytes:
    payload = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + chunk(b"IHDR", payload) + png[33:]


def pillow_first(data: bytes, max_pixels: int) -> tuple:
    """What open_image decided from Pillow's open, for every file, before plain PNGs skipped it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP", "GIF", "BMP"))
        width, height = image.size
    except UnidentifiedImageError:
        return (415,)
    except Image.DecompressionBombError:
        return (413,)
    except Exception:  # noqa: BLE001 - a malformed header
        return (422,)
    if width <= 0 or height <= 0:
        return (422,)
    if width * height > max_pixels:
        return (413,)
    return ("ok", image.format, width, height)


def verdict(data: bytes, max_pixels: int) -> tuple:
    try:
        opened = open_image(data, max_pixels=max_pixels)
    except ApiError as error:
        return (error.status,)
    return ("ok", opened.format, opened.width, opened.height)


def plain_png(seed: int = 0) -> bytes:
    return encoded("PNG", picture("RGB", (SIDE, SIDE), seed))


def test_a_plain_png_is_checked_without_pillows_open():
    opened = open_image(plain_png(), max_pixels=MAX_PIXELS)
    assert opened._image is None  # nothing of Pillow's yet
    assert (opened.format, opened.width, opened.height) == ("PNG", SIDE, SIDE)
    pixels = plain_png_pixels(opened, SIDE)
    opened.close()
    assert opened._image is None  # libspng decoded it; Pillow was never needed
    with Image.open(io.BytesIO(plain_png())) as reference:
        assert np.array_equal(pixels, to_pixels(reference.convert("RGB"), SIDE))


CASES = {
    "plain": plain_png(),
    "plain, other side": encoded("PNG", picture("RGB", (SIDE + 3, SIDE - 5))),
    "every allowed chunk": after_ihdr(
        plain_png(),
        chunk(b"sRGB", b"\x00"),
        chunk(b"gAMA", struct.pack(">I", 45455)),
        chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)),
        chunk(b"cHRM", bytes(32)),
    ),
    "empty sRGB": after_ihdr(plain_png(), chunk(b"sRGB", b"")),
    "short gAMA": after_ihdr(plain_png(), chunk(b"gAMA", b"\x00\x01")),
    "long gAMA": after_ihdr(plain_png(), chunk(b"gAMA", bytes(6))),
    "short pHYs": after_ihdr(plain_png(), chunk(b"pHYs", bytes(5))),
    "odd cHRM": after_ihdr(plain_png(), chunk(b"cHRM", bytes(7))),
    "zero width": with_ihdr(plain_png(), 0, SIDE),
    "zero height": with_ihdr(plain_png(), SIDE, 0),
    "over the pixel limit": with_ihdr(plain_png(), 5000, 5000),
    "over Pillow's bomb limit": with_ihdr(plain_png(), 20000, 20000),
    "huge": with_ihdr(plain_png(), 0xFFFFFFFF, 0xFFFFFFFF),
    "no image data": plain_png()[:33] + chunk(b"IEND", b""),
    "trailing bytes": plain_png() + b"after the end",
    "truncated": plain_png()[:-30],
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("max_pixels", [MAX_PIXELS, 1 << 30])
def test_each_file_gets_the_verdict_pillows_open_gives(name, max_pixels):
    data = CASES[name]
    assert verdict(data, max_pixels) == pillow_first(data, max_pixels), name


def test_every_mutant_of_a_plain_png_gets_pillows_verdict_and_pixels():
    rng = random.Random("dynfuse-plain-open")
    plain_taken = 0
    for seed in range(4):
        for data in mutations(plain_png(seed), rng, 250):
            want = pillow_first(data, MAX_PIXELS)
            assert verdict(data, MAX_PIXELS) == want
            if want[0] != "ok":
                continue
            opened = open_image(data, max_pixels=MAX_PIXELS)
            plain_taken += opened._image is None
            try:
                got = to_pixels(decode_image(opened, side=SIDE), SIDE)
            except ApiError as error:
                got = error.status
            try:
                with Image.open(io.BytesIO(data)) as reference:
                    reference.load()
                    expected = to_pixels(reference.convert("RGB"), SIDE) if reference.size == (SIDE, SIDE) else None
            except Exception:  # noqa: BLE001 - Pillow refuses the data: the server answers 422
                expected = 422
            if expected is not None:
                assert np.array_equal(got, expected) if not isinstance(expected, int) else got == expected
    assert plain_taken > 0  # the fuzzer did reach files the IHDR alone decides

"""What decoding a request's image costs, counted: how often Pillow opens the file, how often a PNG's chunks are walked
for the plain-PNG verdict, how often libspng is asked, whether the picture is copied, how many rows a strip holds.

Every request's image passes here (service.inference.ImageDecoder.pixels_now: ``open_image``, ``plain_png_pixels``,
then ``decode_image`` unless libspng gave the pixels), so work done twice is paid on every request. The counts come
from spies that call through to the real functions (Pillow's ``Image.open``, libspng's ``load``, the decoder's own
``_plain_png``), and each test also checks the pixels against the picture the test built, so a count can only be
met by a decode that is right."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from test_decode import MAX_PIXELS, SIDE, encoded

from models.preprocess import to_pixels
from service import decode
from service.decode import OpenedImage, decode_image, open_image, plain_png_pixels
from service.errors import InvalidInput, PayloadTooLarge


class Spy:
    """Calls through to the real function, and keeps each call's arguments (a method's with its instance first)."""

    def __init__(self, function):
        self.function = function
        self.calls: list[tuple] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.function(*args, **kwargs)

    def __get__(self, instance, owner):  # set on a class, it binds as the method it stands for
        return self if instance is None else functools.partial(self, instance)


class Costs:
    """Spies on what a decode may do more than once: Pillow's open, the plain-PNG walk, libspng's decode."""

    def __init__(self, monkeypatch):
        self.opens = Spy(Image.open)
        monkeypatch.setattr(Image, "open", self.opens)
        self.walks = Spy(decode._plain_png)
        monkeypatch.setattr(decode, "_plain_png", self.walks)
        self.spng = None
        if decode.pyspng is not None:  # installed on Linux x86-64 (pyproject.toml): test_decode.py checks which
            self.spng = Spy(decode.pyspng.load)
            monkeypatch.setattr(decode.pyspng, "load", self.spng)

    def counted(self) -> tuple[int, int, int]:
        return len(self.opens.calls), len(self.walks.calls), len(self.spng.calls) if self.spng else 0


def served(data: bytes, side: int = SIDE) -> np.ndarray:
    """What a request's image becomes, step by step as ImageDecoder.pixels_now takes it (service/inference.py)."""
    opened = open_image(data, max_pixels=MAX_PIXELS)
    pixels = plain_png_pixels(opened, side)
    if pixels is not None:
        opened.close()
        return pixels
    return to_pixels(decode_image(opened, side=side), side)


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def hand_png(pixels: np.ndarray, idat_chunks: int = 1, before_end: bytes = b"") -> bytes:
    """An 8-bit RGB PNG written here (not by Pillow): filter 0 on every row, the deflate stream cut into
    ``idat_chunks`` IDAT chunks, then ``before_end``, then IEND."""
    height, width, _ = pixels.shape
    stream = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))
    cuts = [len(stream) * i // idat_chunks for i in range(idat_chunks + 1)]
    idats = b"".join(png_chunk(b"IDAT", stream[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + idats + before_end + png_chunk(b"IEND", b"")


def test_a_plain_png_at_the_model_side_is_never_opened_by_pillow_and_walked_once(monkeypatch):
    """The path most requests take: the IHDR is read, the chunks walked once (open_image keeps the verdict for
    plain_png_pixels), libspng decodes; Pillow never opens the file."""
    source = noise(SIDE, SIDE)
    data = hand_png(source)
    costs = Costs(monkeypatch)
    pixels = served(data)
    assert np.array_equal(pixels, source)
    if decode.pyspng is not None:
        assert costs.counted() == (0, 1, 1)
    else:  # every PNG is Pillow's: one open, when decode_image first needs it
        assert costs.counted() == (1, 1, 0)


NEEDS_PILLOW = {
    "alpha at the model side": lambda: encoded("PNG", Image.fromarray(noise(SIDE, SIDE, 4, 1), "RGBA")),
    "JPEG at the model side": lambda: encoded("JPEG", Image.fromarray(noise(SIDE, SIDE, 3, 2)), quality=95),
    "plain, one row more than the model side": lambda: hand_png(noise(SIDE + 1, SIDE, 3, 3)),
    "plain, one column more": lambda: hand_png(noise(SIDE, SIDE + 1, 3, 4)),
    "plain, twice the model side": lambda: hand_png(noise(2 * SIDE, 2 * SIDE, 3, 5)),
}


@pytest.mark.parametrize("name", sorted(NEEDS_PILLOW))
def test_a_file_that_needs_pillow_is_opened_once_and_walked_once(name, monkeypatch):
    """Pillow's open happens once per request whichever step first needs it (open_image for a file that is not plain,
    decode_image for a plain PNG of another size); the plain verdict is computed once; libspng is not asked to decode
    a file it would then be refused for."""
    data = NEEDS_PILLOW[name]()
    with Image.open(io.BytesIO(data)) as reference:  # the expected pixels, before the spies
        expected = to_pixels(reference.convert("RGB"), SIDE)
    costs = Costs(monkeypatch)
    assert np.array_equal(served(data), expected)
    assert costs.counted() == (1, 1, 0), name


@pytest.mark.parametrize(("width", "height"), [(1, 40), (40, 1)])
def test_a_plain_png_one_pixel_wide_or_high_is_checked_from_its_header(width, height, monkeypatch):
    source = noise(height, width, 3, 6)
    costs = Costs(monkeypatch)
    opened = open_image(hand_png(source), max_pixels=MAX_PIXELS)
    assert (opened.width, opened.height) == (width, height)
    assert costs.counted() == (0, 1, 0)  # no Pillow open for the header
    assert np.array_equal(np.asarray(decode_image(opened, side=SIDE)), source)
    assert costs.counted() == (1, 1, 0)  # the one open, to decode


def test_a_plain_png_at_exactly_pillows_bomb_limit_is_checked_from_its_header(monkeypatch):
    """Pillow lets a picture of exactly MAX_IMAGE_PIXELS through (it acts above it), so the IHDR alone decides it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIDE * SIDE)
    source = noise(SIDE, SIDE, 3, 7)
    data = hand_png(source)
    costs = Costs(monkeypatch)
    opened = open_image(data, max_pixels=MAX_PIXELS)
    assert opened._image is None
    assert costs.counted() == (0, 1, 0)
    opened.close()
    assert np.array_equal(served(data), source)


def test_a_plain_png_over_pillows_warning_limit_is_opened_by_pillow_and_still_decoded_by_libspng(monkeypatch):
    """Over MAX_IMAGE_PIXELS (under twice it, where Pillow refuses) Pillow's own bomb rule is applied: its open
    checks the file. The file is still plain, so libspng decodes it from its bytes, without a second open."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIDE * SIDE - 1)
    source = noise(SIDE, SIDE, 3, 8)
    data = hand_png(source)
    costs = Costs(monkeypatch)
    opened = open_image(data, max_pixels=MAX_PIXELS)
    assert opened._image is not None  # Pillow's view, from its open
    pixels = plain_png_pixels(opened, SIDE)
    if decode.pyspng is None:
        assert pixels is None
        return
    assert pixels is not None
    assert np.array_equal(pixels, source)
    assert costs.counted() == (1, 1, 1)


def test_with_pillows_bomb_limit_switched_off_a_plain_png_is_still_checked_from_its_header(monkeypatch):
    """An application may set Image.MAX_IMAGE_PIXELS to None (Pillow's documented switch). A plain PNG is then bounded
    by its sides alone (each under 2^31, as PNG allows), and its header is still read without Pillow: here one of
    100,000 x 100,000 pixels (1e10, over 2^32) is refused by our own pixel limit from its IHDR."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + png_chunk(b"IEND", b"")
    costs = Costs(monkeypatch)
    with pytest.raises(PayloadTooLarge, match="image: 100000x100000 pixels is over the limit of 16,777,216 pixels"):
        open_image(data, max_pixels=MAX_PIXELS)
    assert costs.counted() == (0, 1, 0)
    source = noise(SIDE, SIDE, 3, 9)
    assert np.array_equal(served(hand_png(source)), source)


def test_an_opened_image_whose_verdict_is_not_known_yet_gets_it_when_its_pixels_are_asked(monkeypatch):
    """``OpenedImage(plain=None)``: the verdict is not known yet (its documented default); plain_png_pixels then walks
    the chunks itself, once."""
    source = noise(SIDE, SIDE, 3, 10)
    plain = hand_png(source)
    alpha = encoded("PNG", Image.fromarray(noise(SIDE, SIDE, 4, 11), "RGBA"))
    costs = Costs(monkeypatch)
    unknown = OpenedImage(None, "PNG", SIDE, SIDE, plain)
    pixels = plain_png_pixels(unknown, SIDE)
    if decode.pyspng is None:
        assert pixels is None
        return
    assert np.array_equal(pixels, source)
    assert plain_png_pixels(OpenedImage(None, "PNG", SIDE, SIDE, alpha), SIDE) is None
    assert costs.counted() == (0, 2, 1)  # one walk each; libspng only for the plain one


def test_a_png_with_more_chunks_than_the_walk_takes_goes_pillows_way_and_keeps_its_exif_orientation(monkeypatch):
    """The walk stops after MAX_PLAIN_PNG_CHUNKS chunks and leaves the file to Pillow, which reads every chunk: an
    eXIf chunk after 40 IDAT chunks still turns the picture (orientation 3: half a turn), as training (Pillow, then
    exif_transpose) shows it. libspng, which reads no EXIF, must not be given it."""
    exif = Image.Exif()
    exif[0x0112] = 3
    source = noise(SIDE, SIDE, 3, 12)
    data = hand_png(source, idat_chunks=40, before_end=png_chunk(b"eXIf", exif.tobytes()[6:]))  # no "Exif\0\0"
    assert decode.MAX_PLAIN_PNG_CHUNKS < 40
    costs = Costs(monkeypatch)
    assert np.array_equal(served(data), source[::-1, ::-1])
    assert costs.counted() == (1, 1, 0)


def test_a_picture_with_nothing_to_turn_is_decoded_without_a_copy(monkeypatch):
    """decode_image turns the picture it decoded in place: an RGB picture with no EXIF orientation is returned as it
    was decoded, not copied (Pillow's exif_transpose copies one with nothing to turn unless asked not to)."""
    source = noise(SIDE + 5, SIDE - 3, 3, 13)
    opened = open_image(encoded("PNG", Image.fromarray(source)), max_pixels=MAX_PIXELS)
    copies = Spy(Image.Image.copy)
    monkeypatch.setattr(Image.Image, "copy", copies)
    image = decode_image(opened, side=SIDE)
    assert image is opened.image
    assert copies.calls == []
    assert np.array_equal(np.asarray(image), source)  # and it is not closed with the file


def test_a_strip_holds_one_row_of_boxes_when_a_row_is_over_the_strip_budget(monkeypatch):
    """_reduce_in_strips bounds the RGB it holds: a strip is as many whole rows of boxes as STRIP_PIXELS allows, and
    one row of boxes when a single one is over it. The pixels: the palette looked up, then each 2 x 2 box averaged
    (rounded half up, as Pillow's reduce does), worked out here in NumPy."""
    palette = np.random.default_rng(14).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = np.random.default_rng(15).integers(0, 256, (10, 64), dtype=np.uint8)
    image = Image.fromarray(indices, "L").convert("P")
    image.putpalette(palette.tobytes())
    rgb = palette[indices].astype(np.int64)
    expected = (rgb[0::2, 0::2] + rgb[1::2, 0::2] + rgb[0::2, 1::2] + rgb[1::2, 1::2] + 2) // 4
    crops = Spy(Image.Image.crop)
    monkeypatch.setattr(Image.Image, "crop", crops)
    for budget, rows in ((100, 2), (64 * 2 * 2, 4)):  # under one row of boxes (128 pixels); two rows of boxes
        crops.calls.clear()
        monkeypatch.setattr(decode, "STRIP_PIXELS", budget)
        reduced = decode._reduce_in_strips(image, (2, 2))
        heights = [box[3] - box[1] for _, box in crops.calls]
        assert heights == [rows] * (10 // rows) + ([10 % rows] if 10 % rows else []), budget
        assert np.array_equal(np.asarray(reduced), expected)


def test_a_big_cmyk_picture_is_averaged_in_cmyk_then_converted_to_rgb():
    """A CMYK JPEG (what print workflows write) is box-averaged in its own mode, then converted to RGB once, at the
    reduced size, as the module's docstring says: not converted first (a strip at a time). The two orders differ by
    one level where a box's rounding falls differently; the expected pixels are the box means of the CMYK values
    Pillow decodes, worked out in NumPy (rounded half up), then converted."""

    side = 4  # target 8: a 32 x 12 picture is reduced by (4, 1), and no draft (its short side is under 16)
    cmyk = noise(12, 32, 4, 16)
    data = encoded("JPEG", Image.frombytes("CMYK", (32, 12), cmyk.tobytes()), quality=95)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode == "CMYK"
        values = np.asarray(stored).astype(np.int64)  # (12, 32, 4): what the file holds, decoded
    boxes = values.reshape(12, 8, 4, 4)
    averaged = ((boxes.sum(axis=2) + 2) // 4).astype(np.uint8)
    expected = np.asarray(Image.frombytes("CMYK", (8, 12), averaged.tobytes()).convert("RGB"))
    rgb = np.asarray(Image.frombytes("CMYK", (32, 12), values.astype(np.uint8).tobytes()).convert("RGB"))
    converted_first = (rgb.astype(np.int64).reshape(12, 8, 4, 3).sum(axis=2) + 2) // 4
    assert not np.array_equal(converted_first, expected)  # this picture tells the two orders apart

    image = decode_image(open_image(data, max_pixels=MAX_PIXELS), side=side)
    assert (image.mode, image.size) == ("RGB", (8, 12))
    assert np.array_equal(np.asarray(image), expected)


@pytest.mark.parametrize(("width", "height"), [(0, 7), (7, 0), (0, 0)])
def test_a_header_with_a_side_of_zero_is_refused_by_the_decoders_own_check(width, height):
    """Pillow refuses such headers itself today; the decoder does not rely on it (nothing is divided by a side)."""
    with pytest.raises(InvalidInput) as refused:
        decode._checked(OpenedImage(None, "PNG", width, height, b""), MAX_PIXELS)
    assert refused.value.status == 422
    assert refused.value.message == f"image: the header gives a size of {width}x{height} pixels"

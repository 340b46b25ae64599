"""Image decoding: every failure is a 4xx (a seeded fuzzer over every accepted format), formats we do not
accept are 415 whatever Pillow could open, the cost is decided from the header, big images are reduced
while decoding, and an image already at the model's size becomes exactly the pixels training saw."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from models.preprocess import to_pixels, to_rgb
from service.decode import IMAGE_FORMATS, check_text, decode_image, is_blank, open_image, plain_png_pixels
from service.errors import ApiError

MAX_PIXELS = 4096 * 4096
SIDE = 32  # the tiny model's side; the default model reads 64


def encoded(fmt: str, image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def picture(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def animated(fmt: str) -> bytes:
    frames = [picture("RGB", (24, 18), seed) for seed in range(3)]
    return encoded(fmt, frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)


def with_orientation(fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(fmt, picture("RGB", (30, 20)), exif=exif.tobytes())


def seeds() -> dict[str, bytes]:
    """Small valid files of every accepted format, in the modes and variants each one can carry."""
    return {
        "png-rgb": encoded("PNG", picture("RGB", (23, 17))),
        "png-rgb-model-side": encoded("PNG", picture("RGB", (SIDE, SIDE))),  # plain_png_pixels decodes it
        "png-palette": encoded("PNG", picture("P", (23, 17))),
        "png-rgba": encoded("PNG", picture("RGBA", (23, 17))),
        "png-gray16": encoded("PNG", picture("L", (23, 17)).convert("I;16")),
        "png-bilevel": encoded("PNG", picture("1", (23, 17))),
        "png-interlaced": encoded("PNG", picture("RGB", (23, 17)), optimize=False, interlace=1),
        "apng": animated("PNG"),
        "jpeg": encoded("JPEG", picture("RGB", (40, 30)), quality=80),
        "jpeg-gray": encoded("JPEG", picture("L", (40, 30))),
        "jpeg-cmyk": encoded("JPEG", picture("CMYK", (40, 30))),
        "jpeg-progressive": encoded("JPEG", picture("RGB", (40, 30)), progressive=True),
        "jpeg-exif-rotated": with_orientation("JPEG", 6),
        "gif": encoded("GIF", picture("P", (23, 17))),
        "gif-animated": animated("GIF"),
        "webp-lossy": encoded("WEBP", picture("RGB", (23, 17)), quality=70),
        "webp-lossless": encoded("WEBP", picture("RGBA", (23, 17)), lossless=True),
        "webp-animated": animated("WEBP"),
        "webp-exif-rotated": with_orientation("WEBP", 8),
        "bmp": encoded("BMP", picture("RGB", (23, 17))),
        "bmp-palette": encoded("BMP", picture("P", (23, 17))),
        "bmp-rle8": _bmp_rle8(),
    }


def _bmp_rle8() -> bytes:
    """An 8-bit run-length encoded BMP (Pillow decodes RLE in Python: worth fuzzing on its own)."""
    width, height = 8, 4
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    rows = b"".join(bytes((width, row * 40)) + b"\x00\x00" for row in range(height)) + b"\x00\x01"
    header_size = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    file_header = b"BM" + struct.pack("<IHHI", header_size + len(rows), 0, 0, header_size)
    return file_header + info + palette + rows


def mutations(data: bytes, rng: random.Random, count: int):
    """Seeded mutants of one file: bit flips, truncations, overwritten runs, duplicated and removed spans,
    and extreme 16/32-bit values written over the header (where sizes and counts live)."""
    for _ in range(count):
        mutant = bytearray(data)
        kind = rng.randrange(6)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(len(mutant))
                mutant[position] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del mutant[rng.randrange(1, len(mutant)) :]
        elif kind == 2:
            start = rng.randrange(len(mutant))
            for position in range(start, min(len(mutant), start + rng.randint(1, 16))):
                mutant[position] = rng.randrange(256)
        elif kind == 3:
            start = rng.randrange(len(mutant))
            end = min(len(mutant), start + rng.randint(1, 64))
            mutant[end:end] = mutant[start:end] * rng.randint(1, 4)
        elif kind == 4:
            start = rng.randrange(len(mutant))
            del mutant[start : start + rng.randint(1, 32)]
        else:
            position = rng.randrange(min(len(mutant) - 4, 64))
            value = rng.choice((0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)))
            mutant[position : position + 4] = struct.pack(rng.choice(("<I", ">I")), value)
        yield bytes(mutant)


def outcome(data: bytes) -> str:
    """'ok' with a (SIDE, SIDE, 3) result, or the 4xx status; anything else escapes and fails the test. What the
    plain-PNG decoder makes of the file, when it takes it, is exactly what Pillow's path makes of it."""
    plain = None
    try:
        opened = open_image(data, max_pixels=MAX_PIXELS)
        plain = plain_png_pixels(opened, SIDE)
        image = decode_image(opened, side=SIDE)
    except ApiError as error:
        status = error.status
    else:
        status = None
    if status is not None:
        assert plain is None, f"libspng decoded a file Pillow refuses with {status}"
        assert status in (413, 415, 422), status
        return str(status)
    assert image.mode == "RGB"
    assert to_pixels(image, SIDE).shape == (SIDE, SIDE, 3)
    if plain is not None:
        assert np.array_equal(plain, to_pixels(image, SIDE))
    return "ok"


@pytest.mark.parametrize(("name", "data"), sorted(seeds().items()))
def test_every_mutant_of_every_accepted_format_decodes_or_is_a_4xx(name, data):
    assert outcome(data) == "ok", f"the seed {name} itself must decode"
    rng = random.Random(f"dynfuse-{name}")
    results = [outcome(mutant) for mutant in mutations(data, rng, 150)]
    assert "ok" in results or "422" in results  # the fuzzer did reach the decoder


def other_formats() -> dict[str, bytes]:
    """Files that Pillow opens (and writes here) but we do not accept. Each must be written: a codec this Pillow
    lacks fails here rather than leave its format out of the test."""
    image = picture("RGB", (16, 16))
    sources = {"MSP": image.convert("1"), "XBM": image.convert("1"), "BLP": image.convert("P")}
    files = {
        fmt: encoded(fmt, sources.get(fmt, image))
        for fmt in ("TIFF", "ICO", "PPM", "PCX", "SGI", "TGA", "QOI", "DDS", "JPEG2000", "BLP", "MSP", "XBM")
    }
    files["TIFF-deflate"] = encoded("TIFF", image, compression="tiff_adobe_deflate")
    files["MPO-as-TIFF-header"] = b"II*\x00" + bytes(904)  # the 908-byte shape of the fuzzed TIFF that made a 500
    return files


@pytest.mark.parametrize(("name", "data"), sorted(other_formats().items()))
def test_formats_we_do_not_accept_are_415(name, data):
    with pytest.raises(ApiError) as error:
        open_image(data, max_pixels=MAX_PIXELS)
    assert error.value.status == 415, error.value.message
    assert "PNG" in error.value.message


def png_header_only(width: int, height: int, color_type: int = 3) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_the_pixel_limit_is_checked_from_the_header_before_any_pixel_is_decoded():
    # A header with no pixel data at all: decoding it would fail, so a 413 proves nothing was decoded.
    with pytest.raises(ApiError) as error:
        open_image(png_header_only(5000, 5000), max_pixels=MAX_PIXELS)
    assert error.value.status == 413
    opened = open_image(png_header_only(4096, 4096), max_pixels=MAX_PIXELS)
    assert opened.pixels == 4096 * 4096


def palette_png(side: int) -> bytes:
    """A palette PNG of side x side that compresses to a couple of KiB: cheap to send, costly to decode."""
    image = Image.new("P", (side, side))
    image.putpalette([value for i in range(256) for value in (i, 255 - i, (7 * i) % 256)])
    image.paste(3, (0, 0, side // 2, side))
    return encoded("PNG", image, optimize=True)


def test_a_big_palette_image_is_reduced_to_twice_the_model_side():
    data = palette_png(4096)
    assert len(data) < 64 * 1024  # what the old rule looked at: it would have decoded this on the event loop
    opened = open_image(data, max_pixels=MAX_PIXELS)
    assert opened.pixels == 4096 * 4096  # what the new rule looks at
    image = decode_image(opened, side=64)
    assert image.size == (128, 128)
    assert image.mode == "RGB"
    left, right = image.getpixel((10, 64)), image.getpixel((117, 64))
    assert left == (3, 252, 21)  # the palette colours survive the reduction
    assert right == (0, 255, 0)


@pytest.mark.parametrize("mode", ["P", "PA", "1", "I;16"])
def test_a_palette_bilevel_or_16_bit_image_is_reduced_a_strip_at_a_time_to_the_same_pixels(mode, monkeypatch):
    from service import decode

    monkeypatch.setattr(decode, "STRIP_PIXELS", 3000)  # many strips, and a last one of a partial box
    rng = np.random.default_rng(3)
    gray = Image.fromarray(rng.integers(0, 256, (777, 1001), dtype=np.uint8))
    image = {"P": gray.convert("P"), "PA": gray.convert("P").convert("PA"), "1": gray.convert("1")}.get(mode)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (777, 1001), dtype=np.uint16)).convert("I;16")
    expected = np.asarray(image.convert("RGB").reduce((7, 5)))
    assert np.array_equal(np.asarray(decode._reduce_in_strips(image, (7, 5))), expected)


def test_decoding_a_big_palette_png_never_holds_it_as_full_size_rgb(tmp_path):
    """The README's claim, measured in a fresh process: a 4096x4096 palette PNG peaks at its 16 MiB of palette
    indices and a strip, far below the 64 MiB Pillow's full-size RGB would take (bench/decode_memory.py)."""
    import json
    import subprocess
    import sys

    from bench.decode_memory import CHILD

    path = tmp_path / "palette.png"
    path.write_bytes(palette_png(4096))
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), "64"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["result"] == [128, 128]
    assert measured["peak_growth_mib"] < 32, measured


def test_a_big_jpeg_is_decoded_at_a_reduced_scale():
    data = encoded("JPEG", picture("RGB", (2048, 1536)), quality=70)
    opened = open_image(data, max_pixels=MAX_PIXELS)
    image = decode_image(opened, side=64)
    # JPEG's DCT scaling decoded it at 1/8 (256 x 192), then the box reduction halved the width only: never
    # below twice the side the model reads. Without the DCT scaling, 1/16 x 1/12 would give 128 x 128.
    assert image.size == (128, 192)


@pytest.mark.parametrize(
    "name", ["png-rgb", "png-palette", "png-rgba", "jpeg", "jpeg-cmyk", "gif", "webp-lossy", "bmp", "jpeg-exif-rotated"]
)
@pytest.mark.parametrize("side", [SIDE, 64])
def test_an_image_at_the_model_size_gives_exactly_the_training_pixels(name, side):
    source = Image.open(io.BytesIO(seeds()[name]))
    source.load()
    data = encoded(source.format, source.resize((side, side)), **({"quality": 90} if source.format == "JPEG" else {}))
    with Image.open(io.BytesIO(data)) as reference:
        reference.load()
        expected = to_pixels(to_rgb(reference), side)  # what training does with a file
    got = to_pixels(decode_image(open_image(data, max_pixels=MAX_PIXELS), side=side), side)
    assert np.array_equal(got, expected)


def test_an_animated_image_is_read_as_its_first_frame():
    for fmt in ("GIF", "PNG", "WEBP"):
        data = animated(fmt)
        with Image.open(io.BytesIO(data)) as reference:
            assert getattr(reference, "n_frames", 1) == 3
            reference.seek(0)
            first = to_pixels(to_rgb(reference), SIDE)
        got = to_pixels(decode_image(open_image(data, max_pixels=MAX_PIXELS), side=SIDE), SIDE)
        assert np.array_equal(got, first), fmt


def halves(size: tuple[int, int]) -> Image.Image:
    """Dark left half, bright right half, with a gradient: a bad reduction shows."""
    width, height = size
    ramp = np.linspace(0, 60, height, dtype=np.float32)[:, None]
    array = np.where(np.arange(width)[None, :] < width // 2, 20.0, 230.0) + ramp  # (H, W)
    return Image.fromarray(np.repeat(array[..., None], 3, axis=2).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_big_picture_with_transparency_keeps_its_stored_colours_when_reduced(mode):
    """Training drops alpha and reads the colours as stored (models.preprocess.to_rgb), whatever the picture's size:
    a big one, reduced while decoded, must not weigh them by alpha (which makes a transparent area black)."""
    pixels = np.empty((1024, 1536, 4), np.uint8)
    pixels[..., :3] = (200, 100, 50)  # one colour everywhere...
    pixels[..., 3] = np.where(np.arange(1536)[None, :] < 768, 255, 0)  # ...opaque on the left, transparent right
    source = Image.fromarray(pixels, "RGBA")
    data = encoded("PNG", source if mode == "RGBA" else source.convert("LA"))
    expected = (200, 100, 50) if mode == "RGBA" else (124, 124, 124)  # ITU-R 601 luma: (200*299+100*587+50*114)/1000
    image = decode_image(open_image(data, max_pixels=MAX_PIXELS), side=64)

    assert (image.mode, image.size) == ("RGB", (128, 128))  # reduced by 12 x 8 to twice the side on each axis
    assert (np.asarray(image) == expected).all()


def test_a_jpeg_exactly_twice_the_target_is_decoded_at_half_scale_by_its_dct():
    """At side 64 the target is 128; a JPEG whose short side is 256 is decoded at 1/2 by libjpeg's DCT scaling (what
    ``draft`` asks), not decoded whole and box-averaged: the pixels are those of the scaled decode."""
    data = encoded("JPEG", picture("RGB", (256, 320)), quality=70)
    with Image.open(io.BytesIO(data)) as scaled:
        scaled.draft("RGB", (128, 128))
        scaled.load()
        assert scaled.size == (128, 160)
        expected = np.asarray(scaled.convert("RGB"))
    with Image.open(io.BytesIO(data)) as whole:
        averaged = np.asarray(whole.convert("RGB").reduce(2))
    assert not np.array_equal(averaged, expected)  # the two ways tell apart on this picture

    got = np.asarray(decode_image(open_image(data, max_pixels=MAX_PIXELS), side=64))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_a_reduced_image_gives_nearly_the_pixels_of_the_full_decode(fmt):
    source = halves((1600, 900))
    data = encoded(fmt, source.convert("P") if fmt == "GIF" else source)
    expected = to_pixels(source, 64).astype(np.int16)  # the source's own pixels, resized whole
    got = to_pixels(decode_image(open_image(data, max_pixels=MAX_PIXELS), side=64), 64).astype(np.int16)
    assert np.abs(got - expected).mean() < 4.0


# Four coloured quadrants, stored as the camera wrote them (top-left, top-right, bottom-left, bottom-right)...
RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 20), (20, 20, 220), (240, 240, 240)
STORED = (RED, GREEN, BLUE, WHITE)
# ...and what a viewer shows for each EXIF orientation (TIFF 6.0 / EXIF 2.3, tag 0x0112), worked out by hand from
# the tag's definition ("the 0th row is the visual top/left/bottom/right side of the image..."):
DISPLAYED = {
    1: ("landscape", (RED, GREEN, BLUE, WHITE)),  # as stored
    2: ("landscape", (GREEN, RED, WHITE, BLUE)),  # mirrored left-right
    3: ("landscape", (WHITE, BLUE, GREEN, RED)),  # turned 180 degrees
    4: ("landscape", (BLUE, WHITE, RED, GREEN)),  # mirrored top-bottom
    5: ("portrait", (RED, BLUE, GREEN, WHITE)),  # transposed: rows become columns
    6: ("portrait", (BLUE, RED, WHITE, GREEN)),  # turned 90 degrees clockwise to view
    7: ("portrait", (WHITE, GREEN, BLUE, RED)),  # transversed
    8: ("portrait", (GREEN, WHITE, RED, BLUE)),  # turned 90 degrees counter-clockwise to view
}


def quadrants(size: tuple[int, int]) -> Image.Image:
    width, height = size
    array = np.empty((height, width, 3), np.uint8)
    for index, colour in enumerate(STORED):
        top, left = (index // 2) * (height // 2), (index % 2) * (width // 2)
        array[top : top + height // 2, left : left + width // 2] = colour
    return Image.fromarray(array)


def quadrant_colours(image: Image.Image) -> list[tuple[int, ...]]:
    """The colour at the centre of each quadrant: top-left, top-right, bottom-left, bottom-right."""
    width, height = image.size
    return [image.getpixel((int(width * x), int(height * y))) for y in (0.25, 0.75) for x in (0.25, 0.75)]


def assert_shows(image: Image.Image, orientation: int, unturned: tuple[int, int]) -> None:
    """``image`` is what a viewer shows for ``orientation``; ``unturned``: the size it has with orientation 1."""
    shape, colours = DISPLAYED[orientation]
    assert image.size == (unturned if shape == "landscape" else unturned[::-1]), (orientation, image.size)
    for got, want in zip(quadrant_colours(image), colours, strict=True):
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 40, (orientation, got, want)


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_exif_orientation_turns_the_picture_the_way_a_viewer_shows_it(fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(fmt, quadrants((48, 32)), exif=exif.tobytes(), **({"quality": 95} if fmt != "PNG" else {}))
    assert_shows(decode_image(open_image(data, max_pixels=MAX_PIXELS), side=SIDE), orientation, (48, 32))


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_big_image_is_turned_by_its_exif_orientation_after_its_reduction_too(fmt, orientation):
    def decoded(orientation: int) -> Image.Image:
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encoded(fmt, quadrants((1600, 900)), exif=exif.tobytes())
        return decode_image(open_image(data, max_pixels=MAX_PIXELS), side=64)

    unturned = decoded(1).size
    assert max(unturned) < 1600  # reduced while decoded
    assert_shows(decoded(orientation), orientation, unturned)


def test_blank_means_the_same_to_the_server_and_to_the_schema_pattern():
    for blank in ("", " ", "\t\n", "\x1f", "\u3000", "\ufeff", "\x85"):
        assert is_blank(blank)
        assert check_text(blank, max_chars=10) is None
    for text in ("a", " x ", "\u200b", "0"):
        assert not is_blank(text)


def promised_formats() -> list[str]:
    """The formats docs/api.md promises, read from its sentence "Accepted: PNG, JPEG, WebP, GIF and BMP."."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    sentence = re.search(r"\*\*Images\.\*\* Accepted: ([^.]+)\.", page)
    assert sentence, "docs/api.md no longer says which image formats are accepted"
    return [name.strip().upper() for name in re.split(r",| and ", sentence.group(1)) if name.strip()]


def test_the_accepted_formats_are_the_ones_the_docs_promise():
    assert promised_formats() == ["PNG", "JPEG", "WEBP", "GIF", "BMP"]
    assert list(IMAGE_FORMATS) == promised_formats()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_promised_format_decodes_here(fmt):
    """Named one by one, not drawn from IMAGE_FORMATS or Pillow's plugins: a Pillow without a codec fails here."""
    from service.decode import missing_codecs

    assert missing_codecs() == []
    data = encoded(fmt, quadrants((48, 32)).convert("P") if fmt == "GIF" else quadrants((48, 32)))
    opened = open_image(data, max_pixels=MAX_PIXELS)
    assert opened.format == fmt
    assert_shows(decode_image(opened, side=SIDE), 1, (48, 32))


def test_serve_refuses_to_start_when_pillow_lacks_a_promised_codec(monkeypatch, tmp_path, capsys):
    from PIL import features

    from service.config import Settings
    from service.decode import missing_codecs
    from service.server import serve

    real_check = features.check
    monkeypatch.setattr(features, "check", lambda name: False if name == "webp" else real_check(name))
    assert missing_codecs() == ["WEBP (webp)"]
    store = tmp_path / "store"
    version = store / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.json").write_text("{}")
    assert serve(Settings(store=store)) == 1
    assert "cannot decode WEBP (webp), which the API accepts" in capsys.readouterr().err


def test_base64_is_read_as_the_standard_library_reads_it():
    """decode_base64 (pybase64 first) against base64.b64decode(validate=True): the same bytes for what it
    accepts, a 422 naming the standard library's error for what it refuses, on random strings rich in padding
    and foreign characters, as data URLs too."""
    import base64
    import binascii

    from service.decode import decode_base64
    from service.errors import InvalidInput

    rng = random.Random(5)
    accepted = refused = 0
    for _ in range(30000):
        text = "".join(rng.choice("QUJDabc01+/=\n -_é") for _ in range(rng.randint(0, 14)))
        sent = f"data:image/png;base64,{text}" if rng.random() < 0.2 else text
        try:
            expected, reason = base64.b64decode(text, validate=True), None
        except (binascii.Error, ValueError) as error:
            expected, reason = None, str(error)
        if expected is not None:
            assert decode_base64(sent) == expected, sent
            accepted += 1
        else:
            with pytest.raises(InvalidInput, match="not valid base64") as refusal:
                decode_base64(sent)
            assert reason in refusal.value.message, sent
            refused += 1
    assert accepted > 1000  # both outcomes exercised
    assert refused > 1000


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def with_chunk(png: bytes, chunk: bytes) -> bytes:
    """The PNG with ``chunk`` inserted right after its IHDR (8 + 25 bytes)."""
    return png[:33] + chunk + png[33:]


def test_a_plain_png_at_the_model_side_is_decoded_by_libspng_to_exactly_pillows_pixels():
    import platform
    import sys

    from service import decode

    # pyproject.toml installs pyspng on Linux x86-64 (its wheels); elsewhere every PNG goes Pillow's way.
    installed = sys.platform == "linux" and platform.machine() == "x86_64"
    assert (decode.pyspng is not None) == installed
    rng = random.Random(11)
    for seed in range(40):
        options = {"compress_level": rng.randint(0, 9), "optimize": rng.random() < 0.3}
        data = encoded("PNG", picture("RGB", (SIDE, SIDE), seed), **options)
        if seed % 4 == 0:  # chunks that change nothing about the pixels
            data = with_chunk(data, png_chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)))
            data = with_chunk(data, png_chunk(b"sRGB", b"\x00"))
        with Image.open(io.BytesIO(data)) as reference:
            expected = to_pixels(to_rgb(reference), SIDE)  # what training does with a file
        got = plain_png_pixels(open_image(data, max_pixels=MAX_PIXELS), SIDE)
        if not installed:
            assert got is None
            assert np.array_equal(
                to_pixels(decode_image(open_image(data, max_pixels=MAX_PIXELS), side=SIDE), SIDE), expected
            )
            continue
        assert got is not None, options
        assert np.array_equal(got, expected)


def test_any_other_png_goes_pillows_way():
    from service import decode

    plain = encoded("PNG", picture("RGB", (SIDE, SIDE)))
    exif = Image.Exif()
    exif[0x0112] = 6
    others = {
        "another side": encoded("PNG", picture("RGB", (SIDE, SIDE + 1))),
        "the model side twice": encoded("PNG", picture("RGB", (2 * SIDE, 2 * SIDE))),
        "palette": encoded("PNG", picture("P", (SIDE, SIDE))),
        "alpha": encoded("PNG", picture("RGBA", (SIDE, SIDE))),
        "grey": encoded("PNG", picture("L", (SIDE, SIDE))),
        "16-bit": encoded("PNG", picture("L", (SIDE, SIDE)).convert("I;16")),
        "interlaced": plain[:28] + b"\x01" + struct.pack(">I", zlib.crc32(plain[12:28] + b"\x01")) + plain[33:],
        "EXIF orientation": encoded("PNG", picture("RGB", (SIDE, SIDE)), exif=exif.tobytes()),
        "text": with_chunk(plain, png_chunk(b"tEXt", b"Comment\x00hello")),
        "transparency": with_chunk(plain, png_chunk(b"tRNS", b"\x00\x01\x00\x02\x00\x03")),
        "animated": animated("PNG"),
        "a bad checksum": plain[:-20] + bytes([plain[-20] ^ 1]) + plain[-19:],
        "JPEG": encoded("JPEG", picture("RGB", (SIDE, SIDE))),
    }
    if decode.pyspng is not None:
        assert plain_png_pixels(open_image(plain, max_pixels=MAX_PIXELS), SIDE) is not None
    for name, data in others.items():
        assert plain_png_pixels(open_image(data, max_pixels=MAX_PIXELS), SIDE) is None, name

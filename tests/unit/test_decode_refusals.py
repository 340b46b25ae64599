"""What a client reads when service/decode.py refuses its input: each refusal's class (its HTTP status) and its exact
message, which says what was wrong and how to fix it; and the limits exactly at their values. Expected messages are
written out here; base64's own complaint comes from the standard library."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import struct
import zlib

import pytest
from PIL import Image

from service.decode import IMAGE_FORMATS, _corrupt, check_text, decode_base64, decode_image, open_image
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType


def png(width: int, height: int, color=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG of only its header and end: what open_image reads."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def test_text_absent_blank_at_and_over_its_limit_and_not_a_string():
    assert check_text(None, max_chars=5) is None
    assert check_text(" \t\u3000", max_chars=5) is None  # blank: a missing modality
    assert check_text(" red ", max_chars=5) == " red "  # kept as sent, exactly at the limit
    with pytest.raises(PayloadTooLarge) as too_long:
        check_text("x" * 1234, max_chars=1000)
    assert too_long.value.message == "text: 1,234 characters is over the limit of 1,000"
    with pytest.raises(InvalidInput) as not_text:
        check_text(12, max_chars=5)
    assert not_text.value.message == "text: must be a string"


def test_base64_plain_and_as_a_data_url_and_what_a_bad_one_is_told():
    assert decode_base64("aGVsbG8=") == b"hello"
    assert decode_base64("data:image/png;base64,aGVsbG8=") == b"hello"
    assert decode_base64("") == b""
    with pytest.raises(InvalidInput) as bad:
        decode_base64("aGVsbG8", field="inputs[2].image")
    with pytest.raises(binascii.Error) as standard:
        base64.b64decode("aGVsbG8", validate=True)
    assert bad.value.message == f"inputs[2].image: not valid base64 ({standard.value})"
    with pytest.raises(InvalidInput, match=r"^image: not valid base64 \("):
        decode_base64("data:image/png;base64,%%%")


def test_an_empty_or_unknown_file_is_told_what_to_send():
    with pytest.raises(InvalidInput) as empty:
        open_image(b"", max_pixels=100)
    assert empty.value.message == "image: empty; send an image file or leave the field out"
    with pytest.raises(UnsupportedMediaType) as unknown:
        open_image(b"%PDF-1.7 not a picture", max_pixels=100)
    assert unknown.value.message == "image: not a supported image file; send one of PNG, JPEG, WEBP, GIF, BMP"
    assert IMAGE_FORMATS == ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # docs/api.md's list, in its order


def test_the_pixel_limit_holds_at_its_value_and_names_the_size_over_it():
    opened = open_image(png(10, 10), max_pixels=100)  # exactly at the limit
    assert (opened.format, opened.width, opened.height) == ("PNG", 10, 10)
    with pytest.raises(PayloadTooLarge) as over:
        open_image(png(10, 11), max_pixels=100)
    assert over.value.message == "image: 10x11 pixels is over the limit of 100 pixels"


def test_a_decompression_bomb_header_is_refused_before_any_pixel():
    with pytest.raises(PayloadTooLarge) as bomb:
        open_image(png_header(100_000, 100_000), max_pixels=40_000_000)
    assert bomb.value.message == "image: over the decompression limit of 40,000,000 pixels"


def test_a_header_pillow_cannot_parse_is_a_corrupt_file_named_by_what_the_parser_said(caplog):
    bmp_of_unknown_header = b"BM" + bytes(20)
    with caplog.at_level(logging.DEBUG, logger="dynfuse"), pytest.raises(InvalidInput) as error:
        open_image(bmp_of_unknown_header, max_pixels=100)
    said = "OSError: Unsupported BMP header type (0)"
    assert error.value.message == f"image: truncated or corrupt image data ({said})"
    assert f"undecodable image: {said}" in [r.getMessage() for r in caplog.records]


def test_a_data_url_is_split_at_its_first_comma():
    with pytest.raises(InvalidInput):
        decode_base64("data:image/png;base64,aGVs,bG8=")  # a comma in the data: not base64


def test_a_picture_twice_the_target_in_one_direction_only_is_reduced_in_that_one():
    opened = open_image(png(20, 40), max_pixels=10_000)
    assert decode_image(opened, side=8).size == (20, 20)  # target 16: the height by 2, the width kept


@pytest.mark.parametrize(
    ("raised", "refusal", "message"),
    [
        (Image.DecompressionBombError("too many"), PayloadTooLarge, "image: over the decompression limit"),
        (MemoryError(), PayloadTooLarge, "image: too large to decode"),
        (OSError("broken stream"), InvalidInput, "image: truncated or corrupt image data (OSError: broken stream)"),
    ],
)  # fmt: skip
def test_what_decoding_raises_becomes_the_clients_error(monkeypatch, raised, refusal, message):
    opened = open_image(png(8, 8), max_pixels=100)

    def load():
        raise raised

    monkeypatch.setattr(opened.image, "load", load)
    with pytest.raises(refusal) as error:
        decode_image(opened, side=8)
    assert error.value.message == message


def test_a_truncated_file_is_refused_as_corrupt_with_what_the_decoder_said():
    data = png(40, 40, (1, 2, 3))
    opened = open_image(data[: len(data) // 2], max_pixels=10_000)
    with pytest.raises(InvalidInput) as error:
        decode_image(opened, side=8)
    assert error.value.message.startswith("image: truncated or corrupt image data (")


def test_a_corrupt_files_message_is_cut_at_500_characters():
    message = _corrupt(ValueError("x" * 600)).message
    assert message == f"image: truncated or corrupt image data (ValueError: {'x' * 600})"[:500]
    assert len(message) == 500


def test_a_picture_one_pixel_wide_or_high_is_accepted():
    for width, height in ((1, 5), (5, 1)):
        opened = open_image(png(width, height), max_pixels=100)
        assert (opened.width, opened.height) == (width, height)
        assert decode_image(opened, side=8).size == (width, height)

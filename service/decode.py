"""Client bytes -> checked inputs: base64, image files (with size limits), text. Every failure is a 4xx.

An image is decoded in two steps, so that what it may cost is known before it costs anything:

1. ``open_image`` reads the header only (format, width, height): the format must be one we accept,
   and width x height must be within the pixel limit (413), or no pixel is decoded.
2. ``decode_image`` decodes the first frame, reduced while it is decoded to about twice what the
   model reads (JPEG's DCT scaling through ``draft``, then ``Image.reduce``'s box average), and
   converts it to RGB exactly as the training images were converted.

An image no larger than twice the model's side in both directions is neither drafted nor reduced:
it becomes pixels exactly as it did in training (``models.preprocess``).

Everything Pillow raises while it reads client bytes is the client's malformed file, never a server
fault: the bytes are all there is, so any exception from them is answered 415 or 422, not 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import warnings
import zlib

import numpy as np
import pybase64
from PIL import Image, UnidentifiedImageError

try:
    import pyspng
except ImportError:  # installed on Linux x86-64 only (pyproject.toml): elsewhere Pillow decodes every PNG
    pyspng = None

from models.preprocess import to_rgb
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

logger = logging.getLogger("dynfuse")

# The formats we mean to accept: what cameras, browsers and image libraries write. Not TIFF (dozens of
# codecs and page layouts behind one header; the fuzzer's first 500 was a TIFF) nor the long tail
# Pillow can also open (PSD, EPS, ICO, DDS, FITS, ...): each is more parser exposed to strangers for
# no caller who needs it. Animated GIF, PNG (APNG) and WebP are read as their first frame.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# The library each format's decoder needs in Pillow's build (GIF and BMP are decoded in Python). A Pillow built
# without one opens no file of that format: ``dynfuse serve`` refuses to start rather than answer 415 to a format
# the documentation promises (``missing_codecs``).
CODECS = {"PNG": "zlib", "JPEG": "jpg", "WEBP": "webp"}

# Modes ``Image.reduce`` averages directly; palette (P, PA), bilevel (1) and 16-bit (I;16*) images become RGB
# first, a strip at a time, since averaging palette indices or packed bits would be meaningless. So do images with
# alpha (LA, RGBA, ...): ``reduce`` weighs their colours by alpha (a transparent box becomes black), where training
# drops alpha and keeps the stored colours (models.preprocess.to_rgb).
REDUCIBLE_MODES = frozenset({"L", "RGB", "RGBX", "CMYK", "YCbCr", "I", "F"})
STRIP_PIXELS = 1 << 18  # the others become RGB a strip of about this many pixels at a time (1 MiB of RGB)

# What a reduced image keeps, in multiples of the model's side: like Pillow's ``thumbnail`` (reducing_gap
# 2), the cheap reduction stops at twice the target so the final bilinear resize still sees every detail.
REDUCING_GAP = 2


def missing_codecs() -> list[str]:
    """The accepted formats this Pillow cannot decode, with the library it lacks: e.g. ``["WEBP (webp)"]``."""
    from PIL import features

    return [f"{fmt} ({CODECS[fmt]})" for fmt in IMAGE_FORMATS if fmt in CODECS and not features.check(CODECS[fmt])]


def decode_base64(data: str, field: str = "image") -> bytes:
    """Standard base64, optionally as a data URL (``data:image/png;base64,...``)."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        # pybase64 (SIMD): 0.8 us for a 12 KB image, where the standard library takes 16. It refuses a few strings
        # the standard library accepts (an extra "=" after a whole quantum), never the other way round, and both
        # give the same bytes: what it refuses gets the standard library's verdict and message, so what is
        # accepted, and how, is unchanged.
        return pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"{field}: not valid base64 ({error})") from None


class OpenedImage:
    """An image whose header has been read and checked; no pixel is decoded yet. ``image`` is Pillow's view of the
    file, opened on first use for a plain PNG (``open_image``), whose pixels libspng decodes without it."""

    def __init__(
        self,
        image: Image.Image | None,
        format: str,
        width: int,
        height: int,
        data: bytes = b"",
        plain: bool | None = None,
    ):
        self._image = image
        self.plain = plain  # whether ``_plain_png`` holds for the file, once known
        self.format = format
        self.width = width
        self.height = height
        self.data = data  # the file itself (plain_png_pixels decodes it without Pillow)

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = _pillow_open(self.data)
        return self._image

    def close(self) -> None:
        """Release Pillow's view of the file, if it was opened."""
        if self._image is not None:
            self._image.close()

    @property
    def pixels(self) -> int:
        """What decoding costs, in pixels: the first frame's width x height (the only frame decoded)."""
        return self.width * self.height


def open_image(data: bytes, *, max_pixels: int) -> OpenedImage:
    """The image's header, checked. 415: not an image of an accepted format; 413: over ``max_pixels``;
    422: a header Pillow cannot make sense of.

    A plain PNG (``_plain_png``: the one kind libspng decodes here) is checked from its IHDR alone: for such a file
    Pillow's open reads the same width and height and cannot fail (every chunk it parses before the image data has
    its checksum right and the length its parser reads), so it is left until something needs it (any image but a
    plain one at the model's side), and the ~15 us it takes a request are saved (bench/BENCHMARKS.md section 8)."""
    if not data:
        raise InvalidInput("image: empty; send an image file or leave the field out")
    plain = _plain_png(data)
    if plain:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        # Pillow refuses a side of 0 (415) and applies its own bomb check first: those go its way.
        limit = Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS is not None else (1 << 31) ** 2
        if 0 < width < 1 << 31 and 0 < height < 1 << 31 and width * height <= limit:
            return _checked(OpenedImage(None, "PNG", width, height, data, plain), max_pixels)
    opened = _pillow_open_checked(data, max_pixels)
    opened.plain = plain
    return _checked(opened, max_pixels)


def _pillow_open_checked(data: bytes, max_pixels: int) -> OpenedImage:
    try:
        image = _pillow_open(data)
        width, height = image.size
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"image: not a supported image file; send one of {', '.join(IMAGE_FORMATS)}"
        ) from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"image: over the decompression limit of {max_pixels:,} pixels") from None
    except Exception as error:  # noqa: BLE001 - anything the header parser raises is a malformed file
        raise _corrupt(error) from None
    return OpenedImage(image, image.format or "unknown", width, height, data)


def _pillow_open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # Our own pixel limit decides; Pillow's warning between its two thresholds is noise.
        warnings.simplefilter("ignore")
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def _checked(opened: OpenedImage, max_pixels: int) -> OpenedImage:
    width, height = opened.width, opened.height
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image: the header gives a size of {width}x{height} pixels")
    if width * height > max_pixels:
        opened.close()
        raise PayloadTooLarge(f"image: {width}x{height} pixels is over the limit of {max_pixels:,} pixels")
    return opened


def decode_image(opened: OpenedImage, *, side: int) -> Image.Image:
    """The first frame as RGB, reduced while decoding to about ``REDUCING_GAP * side`` (the model reads
    ``side`` x ``side``). 422: truncated or corrupt data."""
    target = REDUCING_GAP * side
    image = opened.image
    decoded = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if min(opened.width, opened.height) >= 2 * target:
                # JPEG decodes at 1/2, 1/4 or 1/8 scale (never below target); other formats ignore it.
                image.draft("RGB", (target, target))
            image.load()
            factors = (max(1, image.width // target), max(1, image.height // target))
            if factors != (1, 1):
                image = image.reduce(factors) if image.mode in REDUCIBLE_MODES else _reduce_in_strips(image, factors)
            # Exactly as the training images were converted; in place, since the picture is ours (Pillow would copy
            # even a picture with nothing to turn: 4 us of the ~110 us a 64x64 PNG takes to decode).
            decoded = to_rgb(image, in_place=True)
            return decoded
    except Image.DecompressionBombError:
        raise PayloadTooLarge("image: over the decompression limit") from None
    except MemoryError:
        raise PayloadTooLarge("image: too large to decode") from None
    except Exception as error:  # noqa: BLE001 - a decoder's exception on client bytes is a malformed file
        raise _corrupt(error) from None
    finally:
        if decoded is not opened.image:  # what was decoded from it is a picture of its own
            opened.image.close()


# What may sit in a PNG that plain_png_pixels decodes: chunks that leave its pixels as its image data says. Not
# eXIf or text (Pillow reads an EXIF orientation from both), tRNS, PLTE, acTL/fcTL (animation) or anything else.
PLAIN_PNG_CHUNKS = frozenset({b"IHDR", b"IDAT", b"IEND", b"sRGB", b"gAMA", b"pHYs", b"cHRM"})
# The length the PNG specification gives each of those that has one: Pillow's open parses them, and refuses some that
# are shorter (a file with any other length goes Pillow's way, which decides what it makes of it).
PLAIN_PNG_LENGTHS = {b"IHDR": 13, b"IEND": 0, b"sRGB": 1, b"gAMA": 4, b"pHYs": 9, b"cHRM": 32}
MAX_PLAIN_PNG_CHUNKS = 32  # past this many chunks, Pillow's path (it walks them anyway)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plain_png_pixels(opened: OpenedImage, side: int) -> np.ndarray | None:
    """The (side, side, 3) uint8 pixels of a plain 8-bit RGB PNG already at the model's side, decoded by libspng
    (pyspng) in about two thirds of what Pillow's decode and array copy take; None for any other image, which then goes
    ``decode_image``'s way. PNG is lossless, so both give the same pixels, which training's own conversion
    (``models.preprocess``) would then keep as they are: the plain case is 8-bit truecolour, not interlaced, at
    exactly ``side`` x ``side``, with no chunk outside ``PLAIN_PNG_CHUNKS`` (no EXIF orientation to apply, no
    transparency, palette or animation). What libspng refuses (a bad checksum, truncated data) goes Pillow's way
    too, so a file is refused, or not, as Pillow decides."""
    data = opened.data
    if pyspng is None or opened.format != "PNG" or opened.width != side or opened.height != side:
        return None
    if not (opened.plain if opened.plain is not None else _plain_png(data)):
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # noqa: BLE001 - Pillow's path decides what a file libspng cannot read is
        return None
    if pixels.shape != (side, side, 3) or pixels.dtype != np.uint8:
        return None
    return pixels


def _plain_png(data: bytes) -> bool:
    """8-bit RGB (colour type 2), deflate, standard filters, not interlaced, only chunks of PLAIN_PNG_CHUNKS, each with
    its checksum right and the length PLAIN_PNG_LENGTHS gives it."""
    # IHDR comes first: length 13, then width, height, bit depth, colour type, compression, filter, interlace.
    if data[:16] != PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" or data[24:29] != b"\x08\x02\x00\x00\x00":
        return False
    position = 8
    for _ in range(MAX_PLAIN_PNG_CHUNKS):
        kind = data[position + 4 : position + 8]
        if kind not in PLAIN_PNG_CHUNKS:
            return False
        length = int.from_bytes(data[position : position + 4], "big")
        if PLAIN_PNG_LENGTHS.get(kind, length) != length:
            return False
        end = position + 8 + length
        # Each chunk's checksum, as Pillow's decoder would notice a damaged stream: pyspng has libspng decode
        # whatever the checksums say, so a flipped byte of the image data would otherwise become wrong pixels.
        if data[end : end + 4] != zlib.crc32(data[position + 4 : end]).to_bytes(4, "big"):
            return False
        if kind == b"IEND":
            return True
        position = end + 4
    return False


def _reduce_in_strips(image: Image.Image, factors: tuple[int, int]) -> Image.Image:
    """``image.convert("RGB").reduce(factors)``, the same pixels, without the full-size RGB copy: a palette,
    bilevel or 16-bit image is converted and reduced a strip of rows at a time (Pillow holds RGB at 4 bytes a
    pixel: a 4096x4096 palette PNG would need 64 MiB beside its 16 MiB of indices)."""
    fx, fy = factors
    rows = fy * max(1, STRIP_PIXELS // (image.width * fy))  # whole boxes of ``fy`` rows per strip
    reduced = Image.new("RGB", (-(-image.width // fx), -(-image.height // fy)))
    reduced.info = dict(image.info)  # the EXIF orientation, applied by to_rgb once reduced
    for top in range(0, image.height, rows):
        strip = image.crop((0, top, image.width, min(top + rows, image.height))).convert("RGB")
        reduced.paste(strip.reduce(factors), (0, top // fy))
    return reduced


def _corrupt(error: Exception) -> InvalidInput:
    logger.debug("undecodable image: %s: %s", type(error).__name__, error)
    return InvalidInput(f"image: truncated or corrupt image data ({type(error).__name__}: {error})"[:500])


# A text with no character outside this class is blank (a missing modality). The class is the union of
# Python's and JSON Schema's (ECMA-262) whitespace, so that the server and the OpenAPI document's
# ``pattern`` agree on every string: str.strip() alone would call U+001F blank where the schema does not.
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
_NOT_BLANK = re.compile(NOT_BLANK)


def is_blank(text: str) -> bool:
    return _NOT_BLANK.search(text) is None


def check_text(text: str | None, *, max_chars: int) -> str | None:
    """The text, or None when absent or blank (a blank text is a missing modality)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidInput("text: must be a string")
    if len(text) > max_chars:
        raise PayloadTooLarge(f"text: {len(text):,} characters is over the limit of {max_chars:,}")
    return None if is_blank(text) else text

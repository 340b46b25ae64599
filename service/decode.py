"""Client bytes -> checked inputs: base64, image files (with size limits), text. Every failure is a 4xx."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from models.preprocess import to_rgb
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_base64(data: str, field: str = "image") -> bytes:
    """Standard base64, optionally as a data URL (``data:image/png;base64,...``)."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(f"{field}: not valid base64 ({error})") from None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """A fully decoded RGB image. 415: not an image; 413: over ``max_pixels``; 422: truncated or corrupt."""
    if not data:
        raise InvalidInput("image: empty; send an image file or leave the field out")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's warning between its two thresholds is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            # The header gives the size before any pixel is decoded: refuse bombs here, cheaply.
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(f"image: {width}x{height} pixels is over the limit of {max_pixels:,} pixels")
            image.load()
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"image: not a supported image file; send one of {', '.join(IMAGE_FORMATS)}"
        ) from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"image: over the decompression limit of {max_pixels:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidInput(f"image: truncated or corrupt image data ({error})") from None
    return to_rgb(image)  # exactly as the training images were converted


def check_text(text: str | None, *, max_chars: int) -> str | None:
    """The text, or None when absent or blank (a blank text is a missing modality)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidInput("text: must be a string")
    if len(text) > max_chars:
        raise PayloadTooLarge(f"text: {len(text):,} characters is over the limit of {max_chars:,}")
    return text if text.strip() else None

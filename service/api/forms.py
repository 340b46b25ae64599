"""Reading a form body (multipart or URL-encoded) whole, or not at all.

Starlette's parser answers with what it has when a multipart body ends before its closing boundary: the part
that was cut (often the image, the last and largest) is silently left out, and the request would be answered
from less than the client sent. Here a multipart body counts only once the parser has reached the closing
delimiter (``--BOUNDARY--``); otherwise it is a 400. The sizes and counts are bounded while the body is read:
at most ``max_fields`` fields and one file, each plain field at most ``max_field_bytes`` (413 past it, like
a JSON text over the limit).
"""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError, InvalidInput, MalformedRequest, PayloadTooLarge

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"


class _WholeMultiPartParser(MultiPartParser):
    """Starlette's parser, noting whether the body reached its closing boundary."""

    ended = False

    def on_end(self) -> None:
        self.ended = True


async def read_form(request: Request, content_type: str, *, max_fields: int, max_field_bytes: int) -> FormData:
    """The form, complete: 400 when a multipart body ends before its closing boundary or does not parse, 413
    when a plain field is over ``max_field_bytes``, 422 when it has more fields or files than accepted. The
    caller closes the form (``await form.close()``) once it has read its file."""
    stream = request.stream()
    try:
        if content_type == MULTIPART:
            parser = _WholeMultiPartParser(
                request.headers, stream, max_files=1, max_fields=max_fields, max_part_size=max_field_bytes
            )
            form = await parser.parse()
            if not parser.ended:
                await form.close()
                raise MalformedRequest(
                    "the multipart body ends before its closing boundary ('--' + boundary + '--'): it was cut "
                    "short, so a part may be missing or incomplete; nothing was classified. Send the whole form"
                )
            return form
        return await FormParser(request.headers, stream, max_fields=max_fields, max_part_size=max_field_bytes).parse()
    except MultiPartException as error:
        raise _refusal(error.message, max_fields, max_field_bytes) from None
    except (ApiError, ClientDisconnect):
        raise
    except Exception as error:  # noqa: BLE001 - anything else the parser raises on client bytes: malformed
        raise MalformedRequest(f"malformed form: {type(error).__name__}: {error}"[:300]) from None
    finally:
        await stream.aclose()


def _refusal(message: str, max_fields: int, max_field_bytes: int):
    if "exceeded maximum size" in message:
        return PayloadTooLarge(f"a form field is over the limit of {max_field_bytes:,} bytes")
    if message.startswith("Too many files"):
        return InvalidInput("the form carries more than one file: send one image, once (curl -F image=@photo.png)")
    if message.startswith("Too many fields"):
        return InvalidInput(f"the form has more than {max_fields} fields: send each accepted field at most once")
    return MalformedRequest(f"malformed multipart form: {message}")

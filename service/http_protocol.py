"""uvicorn's httptools protocol with a bound on the request head (request line and headers).

uvicorn bounds nothing before the body with httptools: a 50 MB header line was buffered whole (94 MiB) and took
16 s of the event loop to parse (the parser joins a value's pieces over and over) before the app could refuse
it; 100,000 headers were accepted on every path. Here the head of a request is counted as it arrives, and past
``MAX_HEAD_BYTES`` or ``MAX_HEADERS`` the connection gets a 431 and is closed, whatever the path, before the
app sees anything. Admission (service/admission.py) still answers 431 past its own, smaller, limit on the
headers of every request that does reach the app.

``dynfuse serve`` passes this class to uvicorn (``HTTP_PROTOCOL``, an import string, so that worker processes
import it too).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HTTP_PROTOCOL = "service.http_protocol:BoundedHttpToolsProtocol"
# Generous beside admission's 64 KiB of headers: the count is of whole chunks received while the head is
# incomplete, which may hold the start of a body, or the end of a previous pipelined request.
MAX_HEAD_BYTES = 1 << 20
MAX_HEADERS = 1000


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"code": "headers_too_large", "message": message}}).encode()
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    _in_head = True  # between a message's first byte and the end of its headers
    _head_bytes = 0
    _refused = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        too_many = len(getattr(self, "headers", ())) > MAX_HEADERS
        if self._head_bytes > MAX_HEAD_BYTES or too_many:
            self._refused = True
            what = f"over {MAX_HEADERS:,} headers" if too_many else f"over {MAX_HEAD_BYTES:,} bytes of headers"
            self.transport.write(_refusal(f"the request has {what}; send fewer, shorter headers"))
            self.transport.close()

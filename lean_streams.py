"""Tornado objects that cost less memory per open connection (re-check on every Tornado
upgrade; tests/test_lean_streams.py covers it): IOStreams' queues, and headers no one reads
again.

Each IOStream holds two collections.deque (its pending write futures, its write buffer's
pieces).  A deque allocates a 64-slot block when created, about 600 bytes, and a stream's
queues hold 0-2 items almost always: four per chat stream (the client's connection and
the upstream's) were a tenth of what an open stream costs (bench/scale.py).  A list with
popleft() does the same job for queues that short.

A header set costs about 1.5 KiB with its seven fields, and a streamed response kept
four for as long as it streamed, though none is read again once the stream is under way:
its request's (read), its response's (written), its upstream request's (written) and
response's (read, the body's framing decided).  SENT_HEADERS stands in for the written
ones; the read ones, which Tornado's own frames still refer to, are emptied in place.
"""

from typing import Any

from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream


class ShortQueue(list):
    """The part of collections.deque's interface IOStream uses, for queues of a few items
    (popleft is O(n))."""

    __slots__ = ()

    def popleft(self):  # type: ignore[no-untyped-def]
        return self.pop(0)


def lighten(stream: IOStream) -> IOStream:
    """Swap *stream*'s deques for ShortQueues; call it before the stream is written to."""
    if not stream._write_futures and not stream._write_buffer._buffers:  # type: ignore[attr-defined]
        stream._write_futures = ShortQueue()  # type: ignore[attr-defined]
        stream._write_buffer._buffers = ShortQueue()  # type: ignore[attr-defined]
    return stream


class SentHeaders(HTTPHeaders):
    """Headers already written: empty, and what is set on them goes nowhere, as a header
    set on a Tornado response after its headers were written never reaches the client.
    One instance (SENT_HEADERS) serves every response."""

    def __setitem__(self, name: str, value: str) -> None:
        pass

    def add(self, name: str, value: str, *args: Any, **kwargs: Any) -> None:
        pass


SENT_HEADERS = SentHeaders()


def forget_headers(handler: Any) -> None:
    """*handler* (a RequestHandler) has flushed its headers and streams its body: let its
    response's headers go, and empty its request's."""
    if getattr(handler, "_headers_written", False):
        handler._headers = SENT_HEADERS
        empty_in_place(handler.request.headers)


def empty_in_place(headers: HTTPHeaders) -> None:
    """Drop every field of *headers* and the memory of its tables (deleting the fields one
    by one would keep both dictionaries at their size)."""
    headers._as_list.clear()  # type: ignore[attr-defined]
    headers._combined_cache.clear()  # type: ignore[attr-defined]

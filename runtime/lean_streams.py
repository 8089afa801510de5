"""Tornado objects that cost less memory per open connection: IOStreams' queues, and
headers no one reads again.

Replaces: the `collections.deque` queues inside each IOStream, and the header sets a
streamed response keeps for its whole life.
Why: a deque allocates a 64-slot block when created (about 600 bytes) and an IOStream
holds two, though its queues hold 0-2 items almost always; a header set costs about
1.5 KiB, and a streamed response kept four (its request's, its response's, its upstream
request's and response's) though none is read again once the stream is under way.
What it does instead: a list with popleft() for queues that short; SENT_HEADERS stands in
for the written header sets; the read ones, which Tornado's own frames still refer to,
are emptied in place.
Checked against: Tornado 6.6.1 (IOStream._write_futures, _StreamBuffer._buffers).
tests/test_lean_streams.py fails if an upgrade changes them.
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

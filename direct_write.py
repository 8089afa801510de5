"""A streamed response's body written straight to the client's IOStream (re-check on every
Tornado upgrade; tests/test_direct_write.py covers it).

RequestHandler.flush() costs, per event, a join of the handler's buffer, a future in
HTTP1Connection.write, a done-callback and two loop hops before the awaiting coroutine
resumes, even when the kernel took every byte at once.  Once the headers are out, an SSE
stream needs none of that: it frames each write as Tornado would (a chunk of the chunked
encoding for an HTTP/1.1 client, raw bytes for HTTP/1.0) and writes it to the stream,
whose future is already done when the kernel took it all (the usual case), so the caller
awaits only when the client is behind.  The final zero-length chunk is still written by
handler.finish(); IOStream keeps writes in order.
"""

from typing import Optional

from tornado.concurrent import Future
from tornado.iostream import IOStream
from tornado.web import RequestHandler


class DirectWriter:
    """Writes body bytes of *handler*'s response, whose headers were flushed already."""

    __slots__ = ("stream", "chunked")

    def __init__(self, stream: IOStream, chunked: bool) -> None:
        self.stream = stream
        self.chunked = chunked

    def write(self, data: bytes) -> "Future[None]":
        """Write *data* (not empty); the future is done once the kernel has all of it.
        Raises tornado.iostream.StreamClosedError when the client has gone."""
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        return self.stream.write(data)


def direct_writer(handler: RequestHandler) -> Optional[DirectWriter]:
    """A DirectWriter for *handler*'s response, or None when its connection is not Tornado's
    HTTP/1.x connection as we know it (then flush() is the way)."""
    connection = handler.request.connection
    stream = getattr(connection, "stream", None)
    chunked = getattr(connection, "_chunking_output", None)
    if not isinstance(stream, IOStream) or not isinstance(chunked, bool) \
            or getattr(connection, "_write_finished", True) \
            or getattr(connection, "_expected_content_remaining", None) is not None:
        return None
    return DirectWriter(stream, chunked)

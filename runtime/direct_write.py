"""A streamed response's body written straight to the client's IOStream.

Replaces: `RequestHandler.flush()` (and `HTTP1Connection.write`) for the body of an SSE
stream once its headers are out.
Why: flush() costs, per event, a join of the handler's buffer, a future in
HTTP1Connection.write, a done-callback and two loop hops before the awaiting coroutine
resumes, even when the kernel took every byte at once; per-event cost is the relay's
throughput.
What it does instead: frames each write as Tornado would (a chunk of the chunked encoding
for an HTTP/1.1 client, raw bytes for HTTP/1.0) and sends it on the socket itself while
nothing is queued before it.  Only what the kernel did not take goes through
IOStream.write, so the caller awaits only when the client is behind, and IOStream keeps
the order and meets any error its own way.  The final zero-length chunk is still written
by handler.finish().
Checked against: Tornado 6.6.1 (it reads HTTP1Connection's chunking state and IOStream's
write buffer).  tests/test_direct_write.py fails if an upgrade changes them.
"""

from typing import Optional

from tornado.concurrent import Future
from tornado.iostream import IOStream, SSLIOStream
from tornado.web import RequestHandler


class DirectWriter:
    """Writes body bytes of *handler*'s response, whose headers were flushed already."""

    __slots__ = ("stream", "chunked", "socket")

    def __init__(self, stream: IOStream, chunked: bool) -> None:
        self.stream = stream
        self.chunked = chunked
        # A TLS stream's socket is written through its SSL object: IOStream does that.
        self.socket = None if isinstance(stream, SSLIOStream) else stream.socket

    def write(self, data: bytes) -> "Optional[Future[None]]":
        """Write *data* (not empty): None when the kernel took all of it, else a future
        done once it has.  Raises tornado.iostream.StreamClosedError when the client has
        gone (or the future does)."""
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        stream = self.stream
        # Only while IOStream holds nothing: what it holds goes first.
        if self.socket is not None and not stream._write_buffer and not stream.closed():  # type: ignore[attr-defined]
            try:
                sent = self.socket.send(data)
            except BlockingIOError:  # the kernel's buffer is full: IOStream queues it
                sent = 0
            except OSError as e:  # the client went away: IOStream.write raises, with why
                stream.close(exc_info=e)
                sent = 0
            if sent == len(data):
                return None
            data = data[sent:]
        return stream.write(data)


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

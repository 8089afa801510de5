"""The upstream IOStream: chatterd's state on it, and one recv per token while a body
trickles in (re-check on every Tornado upgrade: UpstreamStream relies on IOStream's
_read_future, _state and _handle_events; tests/test_upstream_http.py and
tests/test_upstream_client.py cover it).  upstreams/http.py gives every plain upstream
connection this class and reads chunked bodies through read_trickle().
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from tornado.concurrent import Future, future_set_result_unless_cancelled
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
from tornado.log import gen_log

MAX_READ = 65536  # the most one body read asks for


class StreamState:
    """What chatterd keeps on an upstream IOStream, in the one attribute `upstream`.

    An IOStream's own attributes nearly fill the instance dictionary CPython shares between
    instances of a class: two attributes more and it becomes a private one, 1.3 KB larger
    per open stream (bench/scale.py)."""

    __slots__ = ("trickle", "read_at", "direct", "sink", "reused", "pool_key", "kept_since")

    def __init__(self, pool_key: Optional[tuple] = None) -> None:
        self.trickle = False     # the body comes a token at a time (UpstreamStream)
        self.read_at = 0.0       # when the body's last read returned
        self.direct = False      # UpstreamStream.read_trickle's read is pending
        self.sink: Optional[Callable[[bytes], Any]] = None  # read_trickle's *sink*
        self.reused = False      # handed out again by KeptAliveTCPClient
        self.pool_key = pool_key  # (host, port, tls) it is kept under
        self.kept_since = 0.0    # when it was last kept


def stream_state(stream: IOStream) -> StreamState:
    """*stream*'s StreamState (made the first time it is asked for)."""
    state = getattr(stream, "upstream", None)
    if state is None:
        state = stream.upstream = StreamState()  # type: ignore[attr-defined]
    return state


class UpstreamStream(IOStream):
    """IOStream that reads a body coming a token at a time with one recv per token.

    For each read, IOStream first tries the socket at once (for a trickling body, a recv
    that fails with EAGAIN: an exception raised and caught, a buffer allocated), then, when
    the socket is readable, reads into a zero-filled buffer, copies the bytes out and
    resolves the read through several layers of bookkeeping.  read_trickle() instead
    waits for the socket and takes what arrived with one recv.  Anything else, or a read
    while IOStream holds buffered bytes, goes the usual way; so do errors and the close
    (a reset or the server's close closes the stream, which fails the read, as IOStream's
    own reads do).  Bursts keep the read at once.

    With a *sink*, each token is handed to it as it arrives, in the IO handler: no future
    resolved, no coroutine resumed, for as long as the sink can take the tokens at once."""

    def read_trickle(self, sink: Optional[Callable[[bytes], Any]] = None) -> "Future[Any]":
        """The next bytes of the body, as read_bytes(MAX_READ, partial=True).

        *sink(data)*, if given, is called with what each recv returns while the read is
        pending: None means it took the bytes and the read goes on; anything else ends the
        read with that as its result.  (It must not raise: an exception closes the stream.)
        Without a direct read (see above), the future is read_bytes' and no sink is called."""
        state = self.upstream
        if not state.trickle or self._read_future is not None or self._read_buffer_size \
                or self.closed():
            return self.read_bytes(MAX_READ, partial=True)
        future = self._read_future = self.io_loop.asyncio_loop.create_future()  # type: ignore[attr-defined]
        state.direct = True
        state.sink = sink
        self._add_io_state(IOLoop.READ)  # (an idle stream listens for reads already)
        return future

    def _handle_events(self, fd: Any, events: int) -> None:
        if self.upstream.direct and events == IOLoop.READ:
            if not self.closed():
                try:
                    self._read_direct()
                except Exception as e:  # as IOStream's own: close, so the read fails, not hangs
                    gen_log.error("Uncaught exception, closing connection.", exc_info=True)
                    self.close(exc_info=e)
                    raise
            return
        super()._handle_events(fd, events)

    def _read_direct(self) -> None:
        try:
            data = self.socket.recv(self.read_chunk_size)
        except BlockingIOError:
            return
        except OSError as e:  # a reset: the stream closes with it, the read fails (as IOStream)
            self.upstream.direct = False
            self.upstream.sink = None
            self.close(exc_info=e)
            return
        state = self.upstream
        if not data:  # the server closed the connection
            state.direct = False
            self.close()
            return
        sink = state.sink
        if sink is not None:
            data = sink(data)
            if data is None:  # taken: the read goes on
                return
            if self._read_future is None:  # the sink closed the stream (its reader has it)
                data = None
                return
        state.direct = False
        state.sink = None
        future, self._read_future = self._read_future, None
        future_set_result_unless_cancelled(future, data)
        # No local keeps the sink's outcome: an error in it has a traceback holding the
        # sink's frame, whose caller is this one (a cycle only a full collection frees).
        data = future = None

    def _try_inline_read(self) -> None:
        # A read asked for the usual way while the body trickles: what is buffered is used
        # at once, else wait for the socket (level-triggered: data waiting shows).
        if not self.upstream.trickle:  # set by BufferedChunkConnection after each read
            return super()._try_inline_read()
        pos = self._find_read_pos()
        if pos is not None:
            self._read_from_buffer(pos)
            return
        self._check_closed()
        self._add_io_state(IOLoop.READ)

"""Server-Sent Events framing and the per-response event stream.

Everything that knows what an SSE byte looks like lives here.  One event is one
write; several events produced together are joined and flushed once.
"""

import asyncio
import time
from typing import Awaitable, Optional

from tornado.iostream import StreamClosedError
from tornado.web import RequestHandler

import jsonfmt
from runtime import coarse_timers, lean_streams
from runtime.direct_write import DirectWriter, direct_writer

KEEPALIVE = b": keepalive\n\n"

HEADERS = (
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    # nginx honours this even when its location forgot `proxy_buffering off`.
    ("X-Accel-Buffering", "no"),
)


def data_events(lines: list[bytes]) -> bytes:
    """Frame each NDJSON line as one `data:` event.

    JSON text never holds a raw newline, so a line needs no further splitting.  Lines
    from upstreams/lines.py (LineSplitter) also hold no raw CR, control character or
    U+2028/U+2029 (an upstream's are escaped there); a CR from anywhere else, which
    would end the SSE line early and could forge an `event:` line, is escaped here too
    (one scan per write, not per line).
    """
    framed = b"".join([b"data: " + line + b"\n\n" for line in lines])
    if b"\r" in framed:
        framed = b"".join([b"data: " + jsonfmt.one_line(line) + b"\n\n" for line in lines])
    return framed


def with_ids(framed: bytes, prefix: bytes, n: int) -> bytes:
    """*framed* (whole events, each ending in a blank line) with an `id:` line on each,
    *prefix* then its number, counting on from *n* (resume/record.py: `id: <turn>:<n>`).
    JSON data holds no raw newline, so a blank line only ever ends an event."""
    if framed.count(b"\n\n") == 1:  # one event (a line per upstream write): no split
        return b"%s%d\n%s" % (prefix, n + 1, framed)
    events = framed.split(b"\n\n")
    events.pop()  # what follows the last blank line: nothing
    return b"".join([b"%s%d\n%s\n\n" % (prefix, i, event) for i, event in enumerate(events, n + 1)])


def data_events_with_ids(lines: list[bytes], prefix: bytes, n: int) -> Optional[bytes]:
    """with_ids(data_events(lines), ...) in one pass; None when a line needs data_events'
    escaping (then frame it first)."""
    if len(lines) == 1:
        framed = b"%s%d\ndata: %s\n\n" % (prefix, n + 1, lines[0])
    else:
        framed = b"".join([b"%s%d\ndata: %s\n\n" % (prefix, i, line)
                           for i, line in enumerate(lines, n + 1)])
    return None if b"\r" in framed else framed


def comment(text: str) -> bytes:
    """One SSE comment line (parsers skip it); line breaks in *text* become spaces."""
    return b": " + " ".join(text.splitlines()).encode() + b"\n\n"


def error_event(message: str) -> bytes:
    return b"event: error\ndata: " + jsonfmt.dumpb({"error": message}) + b"\n\n"


def send_at_once(handler: RequestHandler) -> None:
    """Turn Nagle's algorithm off for *handler*'s streamed response.

    Tornado leaves it on while a response is written (it turns it off only to push out a
    response's end, and on again for the next request): each write after the first would
    wait in the kernel for the client's ACK of the one before, up to the client's
    delayed-ACK time (20-40 ms on Linux), on every network, loopback included."""
    stream = getattr(handler.request.connection, "stream", None)
    if stream is not None:
        stream.set_nodelay(True)


async def flush_within(handler: RequestHandler, timeout: float) -> None:
    """handler.flush(), but a client that does not take it within *timeout* seconds is cut off.

    A flush waits until the kernel has taken every byte, so a client that stops reading
    would hold the response (and, through back-pressure, its upstream call) forever.
    On timeout the client's connection is closed, which makes Tornado call the
    handler's on_connection_close, and StreamClosedError is raised, as for a client
    that left.  A flush the kernel takes at once (the usual case) arms no timer.
    """
    await bounded(handler, handler.flush(), timeout)


async def bounded(handler: RequestHandler, future: "asyncio.Future[None]", timeout: float) -> None:
    """Await *future*, a flush of *handler*, as flush_within() says."""
    if future.done():
        future.result()
        return
    timed_out = False

    def cut() -> None:
        nonlocal timed_out
        timed_out = True
        connection = handler.request.connection
        stream = getattr(connection, "stream", None)
        if stream is not None:
            stream.close()  # fails the pending write; the close callback reaches the handler
        elif connection is not None:
            connection.close()

    timer = asyncio.get_running_loop().call_later(timeout, cut)
    try:
        # A flush cut short by the close resolves without an error; an IOStream write
        # (runtime/direct_write.py) fails with StreamClosedError: either way, say it timed out.
        await future
    except StreamClosedError:
        if not timed_out:
            raise
    finally:
        timer.cancel()
    if timed_out:
        raise StreamClosedError(real_error=TimeoutError(
            f"the client did not read a write within {timeout:g} s"))


class EventStream:
    """Writes events to one handler's response, flushing each write.

    Awaiting every flush is what bounds memory: a client that stops reading
    stops us (and, through the awaited streaming_callback, the upstream read).
    A client that does not take a write within `write_timeout` seconds (--write-timeout)
    is disconnected, so it costs bounded time too.
    Heartbeats fill silences longer than `heartbeat` seconds so proxies keep the
    connection open while the model loads or thinks.  Writes keep their order: the
    first (with the headers) is a flush, and later ones wait for it (Tornado tracks only
    one pending flush, and an overtaken one never resolves); once the headers are out,
    each write goes out at once behind what is queued (runtime/direct_write.py).
    """

    def __init__(self, handler: RequestHandler, heartbeat: float, write_timeout: float) -> None:
        self.handler = handler
        self.heartbeat = heartbeat
        self.write_timeout = write_timeout
        self.opened = False
        self.closed = False
        self._flushing: asyncio.Future | None = None
        self._direct: DirectWriter | None = None  # once the headers are out (runtime/direct_write.py)
        self._last_write = time.monotonic()
        self._timer: coarse_timers.CoarseTimer | None = None  # (a loop timer: 0.5 KiB more)

    def set_headers(self) -> None:
        for name, value in HEADERS:
            self.handler.set_header(name, value)

    async def open(self, first: bytes = b"") -> None:
        """Send the status line and headers now (with *first*, if any) and start heartbeats."""
        self.opened = True
        self._arm(self.heartbeat)
        send_at_once(self.handler)
        await self.send(first)

    async def send(self, data: bytes) -> None:
        """Write *data* and wait until it is handed to the kernel.

        Raises tornado.iostream.StreamClosedError when the client has gone, or has
        not taken the write within `write_timeout` seconds (then its connection is closed).
        """
        # Until the headers are out, and for a connection without a DirectWriter, a write
        # is a flush: one at a time (Tornado tracks only one pending flush, and an overtaken
        # one never resolves).  A flush already done counts as over, whoever clears it.
        while self._direct is None and self._flushing is not None and not self._flushing.done():
            await asyncio.wait([self._flushing])
        if self._direct is not None:
            pending = self.send_now(data)
            if pending is not None:
                await pending
            return
        if self.closed:  # a heartbeat that waited for the stream's last write: nothing more
            return
        if data:
            self.handler.write(data)
        future = self._flushing = self.handler.flush()  # the headers go out with the first
        lean_streams.forget_headers(self.handler)
        self._direct = direct_writer(self.handler)
        await self._flushed(future)

    def send_now(self, data: bytes) -> "Optional[Awaitable[None]]":
        """send(), without a coroutine when it can do without: None when the kernel took
        *data* at once (the usual case) or there was nothing to send, else an awaitable
        (raising as send() does) to await before the next write.

        Once the headers are out, *data* is written at once, after whatever is queued
        (IOStream keeps the order): the awaitable only waits, so the bytes are neither
        held back nor lost if it were never awaited."""
        if self._direct is None:
            return self.send(data)  # the headers first
        if self.closed or not data:
            return None
        future = self._direct.write(data)
        if future is None:  # the kernel took it all
            self._last_write = time.monotonic()
            return None
        self._flushing = future
        return self._flushed(future)

    async def _flushed(self, future: "asyncio.Future[None]") -> None:
        try:
            await bounded(self.handler, future, self.write_timeout)
        finally:
            if self._flushing is future:
                self._flushing = None
            self._last_write = time.monotonic()

    def close(self) -> None:
        """The stream is over (its handler writes no more): stop heartbeats."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self._timer = coarse_timers.call_later(delay, self._beat)

    def _beat(self) -> None:
        quiet = time.monotonic() - self._last_write
        if quiet < self.heartbeat or (self._flushing is not None and not self._flushing.done()):
            self._arm(max(self.heartbeat - quiet, 0.05))
            return
        self._arm(self.heartbeat)
        asyncio.ensure_future(self._send_keepalive())

    async def _send_keepalive(self) -> None:
        try:
            await self.send(KEEPALIVE)
        except Exception:
            # The client left; the relay notices through on_connection_close.
            self.close()

"""What chatterd changes in Tornado's HTTP client, all of it here (re-check on every Tornado
upgrade; tests/test_upstream_http.py covers each override).

Tornado's AsyncHTTPClient is the upstream path, with a streaming_callback.  It has no
public hook for three things chatterd needs, so a small subclass of the private
`_HTTPConnection` adds them:

* abort: a call can be ended at once (the client left, a timeout, a shutdown), which
  is how an upstream is told to stop generating;
* a connection reset mid-body is reported at once (Tornado 6.6.1 waits for
  request_timeout);
* a chunked body is read a buffer at a time: every complete chunk already received is
  decoded in one pass (upstreams/chunked.py) and handed over as one piece, where Tornado
  awaits three reads per chunk.  An LLM server writes one chunk per token, so this is the
  relay's hot path; while the body comes a token at a time, each read is one recv made
  when the socket is readable (UpstreamStream.read_trickle), not IOStream's buffered read,
  and the token goes to the streaming_callback from the IO handler itself, with no
  coroutine resumed unless the callback returns something to await.

* keep-alive: a connection whose response ended cleanly is kept (upstreams/keepalive.py)
  and the next request to the same upstream reuses it, instead of a TCP (and TLS) handshake
  per turn; Tornado's client closes every connection after one response.

The upstream IOStream itself (its one recv per token, chatterd's state on it) is
upstreams/stream.py.

And a resolver that answers IP literals at once and caches names, instead of asking a
thread pool for every request (Tornado's default resolver runs getaddrinfo in one).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import HTTPRequest
from tornado.iostream import IOStream
from tornado.netutil import DefaultLoopResolver, Resolver, is_valid_ip
from tornado.simple_httpclient import SimpleAsyncHTTPClient, _HTTPConnection

from runtime import lean_streams
from upstreams.chunked import ChunkDecoder
from upstreams.keepalive import FreshConnection, KeptAliveTCPClient
from upstreams.stream import MAX_READ, UpstreamStream, stream_state

_MIN_READ = 4096
_TRICKLE = 1024  # a read this small, after a gap of _TRICKLE_GAP: the body comes a token at a time
_TRICKLE_GAP = 0.002  # seconds; a quicker producer's small writes are read in batches instead


class BufferedChunkConnection(HTTP1Connection):
    """HTTP1Connection whose chunked-body reader decodes whole buffers (client side only).

    While the body trickles in (UpstreamStream), each token is decoded and handed to the
    delegate in the IO handler itself: the read's coroutine (this one, under Tornado's
    three layers of HTTP client coroutines) is resumed only when the delegate returns
    something to await (its client is behind), at the body's end, on an error, or when
    the body stops trickling."""

    stray_bytes = False  # the server sent more after the body's end

    async def _read_chunked_body(self, delegate: httputil.HTTPMessageDelegate) -> None:
        stream = self.stream
        state = stream_state(stream)
        # Tornado has read the body's framing from the response's headers, and the call its
        # header_callback: a body that streams for minutes keeps none of them (runtime/lean_streams.py).
        headers = getattr(delegate, "headers", None)
        if isinstance(headers, httputil.HTTPHeaders):
            lean_streams.empty_in_place(headers)
        decoder = ChunkDecoder(self._max_body_size)
        handed: Optional[Handover] = None  # the sink's last, until this coroutine has it

        def take_at_once(data: bytes) -> Optional[Handover]:
            # UpstreamStream's sink: None when done with *data* and reading on.
            nonlocal handed
            try:
                note_read(stream, state, data)
                body = decoder.feed(data)
                if decoder.ended:
                    handed = Handover(body=body)
                    return handed
                pending = delegate.data_received(body) if body else None
                if pending is not None or not state.trickle:
                    handed = Handover(pending=pending)
                    return handed
                return None
            except Exception as e:  # raised by the read, in this coroutine
                handed = Handover(error=e)
                return handed

        direct = type(stream) is UpstreamStream
        try:
            while True:
                try:
                    if direct:
                        data = await stream.read_trickle(take_at_once)
                    else:
                        data = await stream.read_bytes(MAX_READ, partial=True)
                except Exception:
                    # The delegate can close the stream as it takes a token (an abort):
                    # the read fails, but what it returned to await is still awaited.
                    pending = handed.pending if handed is not None else None
                    handed = None
                    if pending is not None:
                        await pending
                    raise
                handed = None
                if type(data) is Handover:
                    if data.error is not None:
                        error, data = data.error, None
                        try:
                            raise error
                        finally:  # (its traceback holds this frame: no cycle through it)
                            del error
                    if data.pending is not None:
                        await data.pending
                    body = data.body
                else:
                    note_read(stream, state, data)
                    body = decoder.feed(data)
                if decoder.ended:
                    self.stray_bytes = decoder.stray  # (then the connection is never reused)
                    if body:
                        await self._deliver_body(delegate, body)
                    return
                if body:
                    await self._deliver_body(delegate, body)
        finally:
            state.sink = None  # (it refers to this connection, which refers to the stream)


class Handover:
    """What BufferedChunkConnection's sink leaves to its coroutine: an awaitable the
    delegate returned, the body's last bytes, or an error to raise."""

    __slots__ = ("pending", "body", "error")

    def __init__(self, pending: Any = None, body: bytes = b"",
                 error: Optional[Exception] = None) -> None:
        self.pending = pending
        self.body = body
        self.error = error


def note_read(stream: IOStream, state: Any, data: bytes) -> None:
    """Size the stream's next read to what arrives, and tell whether the body trickles."""
    # IOStream allocates and zero-fills read_chunk_size bytes for every read it tries, the
    # one that finds the socket empty included (two per token): size it to what arrives,
    # 4 KiB for a token at a time, up to 64 KiB for bursts.
    size = stream.read_chunk_size
    if len(data) >= size:
        stream.read_chunk_size = min(size * 2, MAX_READ)
    elif len(data) * 4 < size and size > _MIN_READ:
        stream.read_chunk_size = size // 2
    # A token at a time means small reads with gaps between them (an LLM's tokens: tens of
    # ms).  Small writes as fast as we read them are a burst: IOStream's read-until-empty
    # batches them, where one recv per wake-up would not.
    now = time.monotonic()
    state.trickle = len(data) < _TRICKLE and now - state.read_at >= _TRICKLE_GAP
    state.read_at = now


class UpstreamRequest(HTTPRequest):
    """HTTPRequest whose attributes are slots: Tornado's own 32 overflow the instance
    dictionary CPython shares between instances (a private one costs 1.3 KB more per open
    stream, bench/scale.py).  `upstream_call` is the call it belongs to (AbortableConnection)."""

    __slots__ = ("_body", "_headers", "allow_ipv6", "allow_nonstandard_methods", "auth_mode",
                 "auth_password", "auth_username", "body_producer", "ca_certs", "client_cert",
                 "client_key", "connect_timeout", "decompress_response", "expect_100_continue",
                 "follow_redirects", "header_callback", "max_redirects", "method",
                 "network_interface", "prepare_curl_callback", "proxy_auth_mode", "proxy_host",
                 "proxy_password", "proxy_port", "proxy_username", "request_timeout",
                 "ssl_options", "start_time", "streaming_callback", "url", "user_agent",
                 "validate_cert", "upstream_call")


class AbortableConnection(_HTTPConnection):
    """_HTTPConnection that its call can abort, that reports a reset at once, and that reads
    chunked bodies a buffer at a time.

    The call (request.request.upstream_call) must have `_connection`, `_abort_error` and
    `connection_failed(error) -> Exception`.
    """

    def __init__(self, client, request, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.call: Any = getattr(request.request, "upstream_call", None)
        # The streaming_callback, when the body can go to it without a redirect check.
        self._on_body = None if request.follow_redirects else request.streaming_callback
        # The keep-alive pool, if the client has one: args are (release_callback,
        # final_callback, max_buffer_size, tcp_client, ...), as SimpleAsyncHTTPClient passes them.
        self._pool = args[3] if len(args) > 3 and isinstance(args[3], KeptAliveTCPClient) else None
        if self._pool is not None and getattr(self.call, "fresh_connection", False):
            args = args[:3] + (FreshConnection(self._pool),) + args[4:]
        super().__init__(client, request, *args, **kwargs)
        if self.call is not None:
            self.call._connection = self
            if self.call._abort_error is not None:  # aborted before its connection existed
                self.abort(self.call._abort_error)

    def abort(self, error: Exception) -> None:
        if self.final_callback is not None:
            self._handle_exception(type(error), error, None)

    def on_connection_close(self) -> None:
        stream = getattr(self, "stream", None)
        try:
            # Tornado 6.6.1 re-raises the socket error here before reporting a result,
            # which leaves fetch() pending until request_timeout.  Report it instead.
            if self.final_callback is not None and stream is not None \
                    and stream.error is not None and self.call is not None:
                self.abort(self.call.connection_failed(stream.error))
                return
            super().on_connection_close()
        finally:
            forget_frames(stream)

    def data_received(self, chunk: bytes) -> Any:
        # Tornado asks _should_follow_redirect() for every chunk, through two _RequestProxy
        # attribute lookups; a request that follows no redirect needs neither.
        if self._on_body is not None:
            return self._on_body(chunk)
        return super().data_received(chunk)

    async def headers_received(self, first_line: Any, headers: httputil.HTTPHeaders) -> None:
        # Asked now: the headers are emptied once the body streams (BufferedChunkConnection).
        if "close" in headers.get("Connection", "").lower():  # the server will close it
            self._keep_wanted = False
        await super().headers_received(first_line, headers)

    async def run(self) -> None:
        self._keep = False
        # Asked for before Tornado's run() fills in its own headers (and before UpstreamCall
        # lets the request's headers go).
        self._keep_wanted = self.request.headers.get("Connection", "").lower() == "keep-alive"
        await super().run()
        # Only now: Tornado's HTTP1Connection clears the stream's callbacks when it has read
        # the response, after finish() ran.
        if self._keep and not self.stream.closed():
            self._pool.keep(self.stream)

    def _on_end_request(self) -> None:
        # The response ended cleanly (finish() runs only then): keep the connection unless
        # either side said close, or it holds bytes that belong to no response.
        keep = (self._keep_wanted and self._pool is not None
                and getattr(self.connection, "_response_start_line", None) is not None
                and self.connection._response_start_line.version == "HTTP/1.1"
                and not getattr(self.connection, "stray_bytes", False)
                and not self.stream._read_buffer_size)  # type: ignore[attr-defined]
        if keep:
            self._keep = True
        else:
            super()._on_end_request()

    def _create_connection(self, stream: IOStream) -> HTTP1Connection:
        state = stream_state(stream)
        reused = state.reused
        if self.call is not None:
            self.call.reused_connection = reused
        stream.set_nodelay(True)  # (Tornado turns it off again after each request)
        if not reused:
            lean_streams.lighten(stream)
            if type(stream) is IOStream:  # (not TLS): same object, its methods
                stream.__class__ = UpstreamStream
                if stream._state is not None:  # type: ignore[attr-defined]
                    # The loop calls the IOStream._handle_events it was given: register
                    # again (at the next read or write) to get UpstreamStream's.
                    stream.io_loop.remove_handler(stream.fileno())
                    stream._state = None  # type: ignore[attr-defined]
        state.trickle = False  # a response's headers are read at once
        stream.read_chunk_size = _MIN_READ  # BufferedChunkConnection adapts it
        return BufferedChunkConnection(
            stream, True,
            HTTP1ConnectionParameters(max_header_size=self.max_header_size,
                                      max_body_size=self.max_body_size,
                                      decompress=bool(self.request.decompress_response)),
            self._sockaddr)


def forget_frames(stream: Any) -> None:
    """Drop the traceback of the error a closed IOStream keeps: its frames refer back to
    the stream (a cycle only a full garbage collection would free; runtime/gc_schedule.py)."""
    forget_traceback(getattr(stream, "error", None))


def forget_traceback(error: Optional[BaseException]) -> None:
    """Drop the tracebacks of *error* and of what it was raised from (done with it)."""
    while error is not None:
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


class AbortableHTTPClient(SimpleAsyncHTTPClient):
    def initialize(self, *args: Any, max_idle: int = 0, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(*args, **kwargs)
        if max_idle > 0:
            self.tcp_client.close()
            self.tcp_client = KeptAliveTCPClient(self.resolver, max_idle)

    def _connection_class(self) -> type:
        return AbortableConnection


class CachingResolver(Resolver):
    """IP literals answered at once; host names looked up (Tornado's default resolver) once
    per `ttl` seconds, so an upstream named `localhost` costs no thread per request."""

    def initialize(self, ttl: float = 60.0) -> None:  # type: ignore[override]
        self.ttl = ttl
        self.fallback = DefaultLoopResolver()
        self.cache: dict[tuple, tuple[float, list]] = {}

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list:
        if is_valid_ip(host):
            inet6 = ":" in host
            if family == socket.AF_UNSPEC or family == (socket.AF_INET6 if inet6 else socket.AF_INET):
                return [(socket.AF_INET6, (host, port, 0, 0))] if inet6 \
                    else [(socket.AF_INET, (host, port))]
        key = (host, port, family)
        hit = self.cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        addresses = await self.fallback.resolve(host, port, family)
        self.cache[key] = (now + self.ttl, addresses)
        return addresses

    def close(self) -> None:
        self.fallback.close()


def http_client(max_clients: int, max_idle: int = 0) -> AbortableHTTPClient:
    """A private client (Tornado's shared one caps max_clients at 10) with the resolver above,
    keeping up to *max_idle* connections per upstream alive between requests."""
    return AbortableHTTPClient(force_instance=True, max_clients=max_clients,
                               resolver=CachingResolver(), max_idle=max_idle)

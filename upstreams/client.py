"""The upstream transport every dialect shares: one POST whose NDJSON body arrives line by
line, and can be cancelled.

The transport is Tornado's AsyncHTTPClient with a streaming_callback, mended where it
has no public hook (abort, resets, buffered chunk reading, keep-alive) in upstreams/http.py;
the errors are upstreams/errors.py, the line framing upstreams/lines.py, the queue of
--max-streams slots upstreams/slots.py.
"""

import asyncio
import socket
import time
from typing import Awaitable, Callable, Optional
from urllib.parse import urlsplit

from tornado import httputil
from tornado.httpclient import HTTPClientError
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

import jsonfmt
import metrics
from runtime import coarse_timers, lean_streams
from settings import Settings
from upstreams.errors import (UpstreamAborted, UpstreamBroken, UpstreamError, UpstreamHTTPError,
                              UpstreamTimeout, UpstreamUnreachable)
from upstreams.http import AbortableConnection, UpstreamRequest, forget_traceback, http_client
from upstreams.lines import LineSplitter
from upstreams.slots import Slots

MAX_ERROR_BODY = 64 * 1024

# on_lines(lines): None when it is done with them, else something to await first (its
# client is behind); an async function does.  The relay's hot path returns None whenever the
# client's kernel took the event at once, so a token costs no coroutine at all.
LinesCallback = Callable[[list[bytes]], Optional[Awaitable[None]]]


def api_base(url: str) -> str:
    """Normalise an Ollama URL: "http://h:11434", ".../" and ".../api" all mean the same."""
    url = url.rstrip("/")
    if url.endswith("/api"):
        url = url[: -len("/api")]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url


class UpstreamClient:
    """Talks to one Ollama server.  Create it on the running IOLoop.

    Its timeouts, --max-streams and --upstream-keepalive come from *config*.  *slots* may
    be shared by several clients (upstreams/router.py does), so --max-streams bounds the
    process, whatever the number of upstreams.
    """

    label = "Ollama"  # how errors name this upstream
    extra_headers: dict[str, str] = {}  # sent with every request (an API key, for instance)

    def __init__(self, url: str, config: Settings, *, slots: Optional["Slots"] = None) -> None:
        self.base = self.base_url(url)
        self.connect_timeout = config.connect_timeout
        self.request_timeout = config.request_timeout
        self.idle_timeout = config.idle_timeout
        self.queue_timeout = config.queue_timeout
        # Requests queue here, explicitly, for at most queue_timeout; never in the HTTP client
        # (its max_clients queue would fail them after connect_timeout as a "timeout").
        self.slots = slots if slots is not None else Slots(config.max_streams)
        self.keepalive = config.upstream_keepalive
        self.http = http_client(config.max_streams, max_idle=self.keepalive)

    @staticmethod
    def base_url(url: str) -> str:
        return api_base(url)

    def post(self, path: str, body: bytes, on_lines: Optional[LinesCallback],
             headers: Optional[dict[str, str]] = None) -> "UpstreamCall":
        """Start POST *path*; each chunk's complete lines go to on_lines(lines) (awaited when
        it returns an awaitable: see LinesCallback).  *headers* are sent with it.

        With on_lines None the whole body is kept in `call.body` instead.
        """
        return UpstreamCall(self, path, body, on_lines, headers=headers)

    async def version(self, timeout: float = 2.0) -> str:
        """Ollama's version string; raises UpstreamError when it does not answer."""
        call = UpstreamCall(self, "/api/version", None, None, timeout=timeout)
        await call.finished()
        return jsonfmt.loads(bytes(call.body)).get("version", "?")

    def close(self) -> None:
        self.http.close()


class UpstreamCall:
    """One request to Ollama.

    `wait_status()` tells the status as soon as the headers arrive; `finished()`
    waits for the end and raises an UpstreamError subclass saying what went wrong;
    `abort()` closes the connection at once, which is how Ollama is told to stop.
    """

    def __init__(self, client: UpstreamClient, path: str, body: Optional[bytes],
                 on_lines: Optional[LinesCallback], timeout: Optional[float] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        self.client = client
        self.url = client.base + path
        self.on_lines = on_lines
        self.status: Optional[int] = None
        self.reason = ""
        self.location = ""  # a redirect's Location, for the error message
        self._interim = False  # reading the header lines of a 1xx interim response
        self.content_type = "application/json"
        self.body = bytearray()  # the error body, or the whole body when on_lines is None
        self.started_at = time.monotonic()
        self._splitter = LineSplitter()
        self._status_known: asyncio.Future = asyncio.get_running_loop().create_future()
        self._connection: Optional[AbortableConnection] = None
        self._abort_error: Optional[UpstreamError] = None
        self._aborted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._slot_taken: asyncio.Future = asyncio.get_running_loop().create_future()
        self._busy = False
        self.reused_connection = False  # set by the connection: a kept-alive one
        self.fresh_connection = False  # the retry asks for a new connection
        self._last_activity = time.monotonic()
        self._idle = client.idle_timeout if timeout is None else timeout
        # The whole request's limit, counted from when it leaves the queue for a slot.  It is
        # kept here, with the idle one, not by Tornado: a loop timer per call would cost
        # 0.8 KiB per open stream (runtime/coarse_timers.py).
        self._total = client.request_timeout if timeout is None else timeout
        self._deadline: Optional[float] = None
        request = UpstreamRequest(
            self.url, method="POST" if body is not None else "GET", body=body,
            headers={"Content-Type": "application/json", "Accept": "application/x-ndjson",
                     "Connection": "keep-alive" if client.keepalive > 0 else "close",
                     **client.extra_headers, **(headers or {})},
            header_callback=self._on_header, streaming_callback=self._on_chunk,
            # A redirect is not Ollama's answer: report it (see _http_error), never follow it.
            follow_redirects=False,
            connect_timeout=min(client.connect_timeout, self._idle, self._total),
            request_timeout=0,  # (no Tornado timer: see self._total)
            decompress_response=False)
        request.upstream_call = self
        queue_timeout = client.queue_timeout if timeout is None else min(timeout, client.queue_timeout)
        # Its result is the response, or the exception that ended it (returned, not raised:
        # a call whose owner never waits for its end, aborted before it was awaited, would
        # log "exception was never retrieved"; finished() raises it).
        self._fetch = asyncio.ensure_future(self._fetch_in_a_slot(request, queue_timeout))
        self._request = request
        self._idle_timer = coarse_timers.call_later(self._idle, self._check_idle)

    def _unlink(self) -> None:
        """The response is over: drop the links between this call, its connection and its
        request (each refers to the others), so reference counting frees them at once
        (see runtime/gc_schedule.py)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.call = None
        request = self._request
        request.streaming_callback = request.header_callback = None
        request.upstream_call = None

    def release(self) -> None:
        """The owner is done with this call: drop what still refers back to it or to the
        owner (its lines callback; the frames in the tracebacks of the errors it keeps),
        so neither waits for a full garbage collection (see runtime/gc_schedule.py)."""
        self.on_lines = None
        errors = [self._abort_error]
        if self._fetch.done() and not self._fetch.cancelled():
            result = self._fetch.result()  # (its error is its result: see __init__)
            if isinstance(result, BaseException):
                errors.append(result)
        for error in errors:
            forget_traceback(error)

    async def _fetch_in_a_slot(self, request: UpstreamRequest, queue_timeout: float) -> object:
        try:
            self._busy = True  # the wait for a slot is not Ollama's silence
            try:
                if not await self.client.slots.take(queue_timeout, self._aborted):
                    raise self._abort_error  # type: ignore[misc]
                self._slot_taken.set_result(None)
            finally:
                self._busy = False
                self._aborted = None  # (needed only by that wait)
            try:
                if self._abort_error is not None:
                    raise self._abort_error
                self._last_activity = started = time.monotonic()
                self._deadline = started + self._total
                self._idle_timer.cancel()
                self._idle_timer = coarse_timers.call_later(min(self._idle, self._total),
                                                            self._check_idle)
                try:
                    return await self.client.http.fetch(request, raise_error=False)
                except (HTTPStreamClosedError, ConnectionError) as e:
                    # A kept-alive connection the server closed just as we wrote on it (the race
                    # every keep-alive client has): it answered nothing, within a round trip, so
                    # ask once more, on a new connection.  A later failure may mean the server
                    # was working on the request: that is not asked twice.
                    if not (self.reused_connection and self.status is None and not self.body
                            and self._abort_error is None and time.monotonic() - started < 1.0):
                        raise
                    forget_traceback(e)
                    self.reused_connection = False
                    self.client.http.tcp_client.drop_idle()  # (reused: a KeptAliveTCPClient's)
                    self.fresh_connection = True  # not one kept since: see upstreams.http
                    return await self.client.http.fetch(request, raise_error=False)
            finally:
                self.client.slots.give_back()
        except Exception as e:  # noqa: BLE001 - the call's result (see __init__)
            return e
        finally:
            self._unlink()

    async def wait_slot(self) -> None:
        """Return once the request holds an upstream slot (at once, unless --max-streams
        are busy) or has failed: a queued turn is not yet waiting for Ollama."""
        if self._slot_taken is not None and not self._slot_taken.done():
            await asyncio.wait([self._slot_taken, self._fetch], return_when=asyncio.FIRST_COMPLETED)

    async def wait_status(self, timeout: float) -> Optional[int]:
        """The HTTP status, or None if it is not known within *timeout* seconds.

        Also returns (None) early when the request fails before any status.
        """
        if self.status is None:
            await asyncio.wait([self._status_known, self._fetch], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        return self.status

    @property
    def failed_early(self) -> bool:
        return self.status is None and self._fetch.done()

    def connection_failed(self, error: BaseException) -> UpstreamError:
        """What a reset of the upstream connection mid-body is reported as."""
        return UpstreamBroken(f"connection to {self.client.label} failed: {error}")

    def abort(self, error: UpstreamError) -> None:
        """End the request now; finished() will raise *error*."""
        if self._abort_error is None:
            self._abort_error = error
        if self._aborted is not None and not self._aborted.done():
            self._aborted.set_result(None)  # stops a wait for a slot
        if self._connection is not None:
            self._connection.abort(self._abort_error)

    async def finished(self) -> None:
        """Wait for the end of the response; raise UpstreamError unless it was a clean 200."""
        try:
            try:
                response = await self._fetch
            finally:
                self._idle_timer.cancel()
            if isinstance(response, Exception):
                raise self._explain(response)  # mapped to what a client should be told
            if self._abort_error is not None:
                raise self._abort_error
            response.error = None  # Tornado's HTTPClientError for a non-200 refers back to it
            if response.code != 200:
                raise self._http_error(response.code)
            await self._at_end()
        except UpstreamError as e:
            if not isinstance(e, UpstreamAborted):
                metrics.UPSTREAM_ERRORS.labels(kind=type(e).__name__).inc()
            raise

    async def _at_end(self) -> None:
        """The body ended cleanly: deliver its last line (one without a final LF)."""
        rest = self._splitter.rest()
        if rest and self.on_lines is not None:
            pending = self._deliver(rest)
            if pending is not None:
                await pending

    def _on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            start = httputil.parse_response_start_line(line.rstrip("\r\n"))
            self._last_activity = time.monotonic()
            # 1xx (103 Early Hints, ...) are interim: Tornado reads on to the real
            # response and reports its status line next.
            self._interim = start.code < 200
            if self._interim or self.status is not None:
                return
            self.status, self.reason = start.code, start.reason
            # The request is sent: its body (the conversation) and headers are not needed
            # for the rest of a response that may stream for minutes.
            self._request.body = None
            self._request.headers = lean_streams.SENT_HEADERS
            self._status_known.set_result(self.status)
            # Each waits no more (the status is known, so a slot was taken): let them go.
            self._status_known = self._slot_taken = None
        elif self._interim:
            return
        elif line[:13].lower() == "content-type:":
            self.content_type = line.split(":", 1)[1].strip()
        elif line[:9].lower() == "location:":
            self.location = line.split(":", 1)[1].strip()

    def _on_chunk(self, chunk: bytes) -> Optional[Awaitable[None]]:
        self._last_activity = time.monotonic()
        if self.status != 200 or self.on_lines is None:
            if self.status != 200 and len(self.body) >= MAX_ERROR_BODY:
                return None
            self.body += chunk
            return None
        try:
            lines = self._splitter.feed(chunk)
        except UpstreamBroken as e:
            self.abort(e)
            return None
        if not lines:
            return None
        return self._deliver(lines)

    def _deliver(self, lines: list[bytes]) -> Optional[Awaitable[None]]:
        pending = self.on_lines(lines)  # type: ignore[misc]
        return None if pending is None else self._await_delivery(pending)

    async def _await_delivery(self, pending: Awaitable[None]) -> None:
        # While we wait on the client (back-pressure), Ollama is not idle: we are.
        self._busy = True
        try:
            await pending
        finally:
            self._busy = False
            self._last_activity = time.monotonic()

    def _check_idle(self) -> None:
        now = time.monotonic()
        if self._deadline is not None and now >= self._deadline:
            self.abort(UpstreamTimeout(f"{self.client.label} request exceeded {self._total:g} s"))
            return
        quiet = now - self._last_activity
        if not self._busy and quiet >= self._idle:
            self.abort(UpstreamTimeout(f"{self.client.label} sent nothing for {self._idle:g} s"))
            return
        delay = self._idle if self._busy else self._idle - quiet
        if self._deadline is not None:
            delay = min(delay, self._deadline - now)
        self._idle_timer = coarse_timers.call_later(max(delay, 0.01), self._check_idle)

    def _http_error(self, code: int) -> UpstreamHTTPError:
        if code < 400:
            # Another 2xx has no NDJSON to relay (a 204 has no body at all) and a 3xx is
            # not Ollama's answer: neither is the client's fault, nor a status to pass on.
            what = f"{code} {self.reason or httputil.responses.get(code, '')}".strip()
            if 300 <= code < 400 and self.location:
                what += f" (redirect to {self.location[:200]})"
            return UpstreamHTTPError(f"{self.client.label} answered {what}, expected 200", status=502)
        text = bytes(self.body).decode("utf-8", "replace").strip()
        try:
            message = jsonfmt.loads(text).get("error") or text
        except (ValueError, AttributeError):
            message = text or f"HTTP {code}"
        if isinstance(message, dict):  # OpenAI's {"error": {"message": ...}}
            message = message.get("message") or jsonfmt.dumps(message)
        return UpstreamHTTPError(f"{self.client.label}: {message}", status=code)

    def _explain(self, e: Exception) -> UpstreamError:
        if self._abort_error is not None:
            return self._abort_error
        if isinstance(e, UpstreamError):
            return e
        if isinstance(e, HTTPTimeoutError):
            if "connecting" in str(e):
                return UpstreamUnreachable(f"cannot reach {self.client.label} at {self.client.base} "
                                         "(connect timed out)")
            return UpstreamTimeout(f"{self.client.label} request exceeded {self._total:g} s")
        if isinstance(e, HTTPStreamClosedError):
            if self.status is None:
                return UpstreamBroken(f"{self.client.label} at {self.client.base} closed the "
                                    "connection without answering")
            return UpstreamBroken(f"{self.client.label} closed the connection mid-response")
        if isinstance(e, HTTPClientError) and e.code != 599:
            return self._http_error(e.code)
        if isinstance(e, (ConnectionError, socket.gaierror, OSError)) and self.status is None:
            return UpstreamUnreachable(f"cannot reach {self.client.label} at {self.client.base}: {e}")
        return UpstreamBroken(f"{self.client.label} request failed: {e}")

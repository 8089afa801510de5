"""What every chatterd handler shares: JSON errors, bounded JSON bodies, access to the app,
and who the request acts for (its credentials, resolved once in prepare())."""

import asyncio
from typing import Any, Awaitable, Optional

from tornado.web import RequestHandler, stream_request_body

import jsonfmt
from accounts.credentials import credential_hash, looks_like_session_id, looks_like_token
from accounts.limits import Limited
from accounts.policy import SESSION_COOKIE
from db import accounts
from db.pool import DatabaseUnavailable
from handlers.credentials import STATE_CHANGING, bearer_token, cross_site
from handlers.validation import ClientError
from settings import Settings
from upstreams.errors import UpstreamAborted
from upstreams.http import forget_frames


INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
NO_CREDENTIALS = {"WWW-Authenticate": 'Bearer realm="chatterd"'}


class BaseHandler(RequestHandler):
    # Set by the chat handlers so the access log can say which conversation and how much.
    app_id: Optional[str] = None
    tokens: Optional[int] = None

    # Who the request acts for, set by prepare(): current_user (Tornado's; a db.accounts.User)
    # and owner_id, the user's id, or 0 for the anonymous namespace.  Class defaults, so an
    # anonymous request sets no attribute at all.
    _current_user = None
    owner_id = 0
    credential: Optional[str] = None  # "session" or "token"
    session_hash: Optional[bytes] = None  # the session's id_hash when credential is "session"
    # Endpoints open to anonymous callers when --auth is required (/, /healthz, /readyz, login).
    public = False
    # Endpoints under the per-caller limits (--user-streams, --user-rate): the model's.
    limited = False
    _limit_key: Any = None

    _registered = False

    def prepare(self) -> Optional[Awaitable[None]]:
        # Registered until the request ends (see _release), so a graceful shutdown waits for it.
        self._registered = True
        self.application.request_started(self)
        if self.application.draining and hasattr(self.request.connection, "_disconnect_on_finish"):
            # Close each connection after its answer, so a proxy's next request opens a
            # connection to a process that is staying.  (No public switch for this in Tornado.)
            self.request.connection._disconnect_on_finish = True
        self.check_headers()
        return self.identify()

    def check_headers(self) -> None:
        """Refusals that need nothing but the request line and headers (before credentials)."""

    # -- who the request acts for -----------------------------------------------------------

    def identify(self) -> Optional[Awaitable[None]]:
        """Resolve the request's credentials: a coroutine when it carries a session cookie or
        a chd_ token (they are looked up in PostgreSQL), else None at once: an anonymous
        request costs no query and no await."""
        headers = self.request.headers
        token = bearer_token(headers.get("Authorization"))
        session_id = self.get_cookie(SESSION_COOKIE) if "Cookie" in headers else None
        if session_id or self.sets_session:
            self.check_same_origin(cookie=bool(session_id))
        if token is None and not session_id:
            self.admit(None)
            return None
        return self._authenticate(token, session_id)

    # Login and signup start a session: a cross-site page must not log a browser in either.
    sets_session = False
    # Login, signup and logout take a session cookie that is no longer valid as no session
    # (and clear it) instead of answering 401.
    replaces_session = False

    def check_same_origin(self, cookie: bool) -> None:
        """403 for a state-changing request that rides on the session cookie (or would set
        one) unless the browser says it comes from this origin: Sec-Fetch-Site same-origin or
        none, or else an Origin equal to scheme://Host (scheme from X-Forwarded-Proto with
        --xheaders).  With the cookie, a request that says neither is refused too; login and
        signup without it are refused only on a browser's evidence of another site."""
        request = self.request
        if request.method not in STATE_CHANGING:
            return
        verdict = cross_site(request.headers.get("Sec-Fetch-Site"), request.headers.get("Origin"),
                             request.protocol, request.host)
        if verdict or (verdict is None and cookie):
            raise ClientError(403, "cross-site request refused: a request authenticated by the "
                                   "session cookie must come from this server's own pages "
                                   "(Sec-Fetch-Site or Origin); scripts use an API token")

    async def _authenticate(self, token: Optional[str], session_id: Optional[str]) -> None:
        policy = self.application.auth
        if token is not None:
            # A chd_ value is a claim to be someone: never a silent fall-back to anonymous.
            user = None
            if looks_like_token(token):
                user = await accounts.token_user(self.pool, credential_hash(token), policy.touch_after)
            if user is None:
                raise ClientError(401, "invalid API token (unknown, revoked, expired or malformed)",
                                  INVALID_TOKEN)
            self.credential = "token"
        else:
            user = None
            id_hash = None
            if looks_like_session_id(session_id):
                id_hash = credential_hash(session_id)  # type: ignore[arg-type]
                user = await accounts.session_user(self.pool, id_hash, policy.session_idle,
                                                   policy.touch_after)
            if user is None:
                self.clear_session_cookie()
                if self.replaces_session:
                    self.admit(None)  # logging in again (or out) is what a stale cookie calls for
                    return
                raise ClientError(401, "login session expired or unknown: log in again",
                                  NO_CREDENTIALS)
            self.credential, self.session_hash = "session", id_hash
        self.current_user = user
        self.owner_id = user.id
        self.admit(user)

    def admit(self, user: Any) -> None:
        """401 when --auth is required and nobody is logged in; 429 over the caller's limits."""
        if user is None and self.application.auth.required and not self.public:
            raise ClientError(401, "this server requires a user: log in (POST /auth/login) or "
                                   "send Authorization: Bearer chd_...", NO_CREDENTIALS)
        limits = self.application.caller_limits
        if self.limited and limits.active:
            caller = ("user", user.id) if user is not None else ("address", self.request.remote_ip)
            try:
                self._limit_key = limits.admit(caller)
            except Limited as e:
                raise ClientError(429, e.message, {"Retry-After": str(e.retry_after)}) from None

    def set_session_cookie(self, session_id: str) -> None:
        """The session cookie: HttpOnly (no script reads it), Secure and __Host- (sent over
        HTTPS only, to this host only, for every path), SameSite=Lax (not on cross-site
        subrequests and form posts).  No Max-Age: the server ends sessions (idle, absolute)."""
        self.set_cookie(SESSION_COOKIE, session_id, path="/", secure=True, httponly=True,
                        samesite="Lax")

    def clear_session_cookie(self) -> None:
        self.clear_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")

    def on_finish(self) -> None:
        self._release()

    def on_connection_close(self) -> None:
        body = getattr(self.request, "_body_future", None)  # set for a streamed body only
        body_pending = body is not None and not body.done()
        super().on_connection_close()  # fails a body still being received
        if body_pending:
            # The body never arrived (the client left, bad chunked framing, body timeout):
            # Tornado then ends the request without finish(), so on_finish never runs.
            self._release()

    def _release(self) -> None:
        """Unregister this request; once, however it ended."""
        if self._registered:
            self._registered = False
            if self._limit_key is not None:
                self.application.caller_limits.release(self._limit_key)
            self.application.request_done(self)

    @property
    def config(self) -> Settings:
        """chatterd's settings (settings.py): self.config.heartbeat, ..."""
        return self.application.config  # type: ignore[attr-defined]

    @property
    def pool(self) -> Any:
        return self.application.pool

    @property
    def upstreams(self) -> Any:
        return self.application.upstreams

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(jsonfmt.dumpb(obj))

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, DatabaseUnavailable):
            status_code = 503
        super().send_error(status_code, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientError):
            message = exc.message
        elif isinstance(exc, DatabaseUnavailable):
            message = str(exc)
        else:
            message = self._reason
        # A message quoting the client (a path, a key) must still encode: never a traceback here.
        message = message.encode("utf-8", "replace").decode("utf-8")
        for name, value in (getattr(exc, "headers", None) or {}).items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(self.error_body(status_code, message))

    def error_body(self, status_code: int, message: str) -> bytes:
        """The JSON body of an error answer (a client dialect may shape it its own way)."""
        return jsonfmt.dumpb({"error": message})

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[no-untyped-def]
        if isinstance(value, (ClientError, DatabaseUnavailable)):
            self.error_message = getattr(value, "message", None) or str(value)
            return  # the access log line says what happened
        super().log_exception(typ, value, tb)


class NotFoundHandler(BaseHandler):
    def check_headers(self) -> None:
        raise ClientError(404, f"no such endpoint: {self.request.method} {self.request.path}")


@stream_request_body
class JSONBodyHandler(BaseHandler):
    """A handler whose POST body is a JSON object of bounded size.

    The body is streamed in so an oversized one is refused with 413 without ever
    being held in memory.
    """

    def check_headers(self) -> None:
        super().check_headers()
        self._body = bytearray()
        self._too_large = False
        self._check_framing()
        limit = self.config.max_body_size
        length = self.request.headers.get("Content-Length")
        if length is not None and int(length) > limit:
            # Answered before the body, the connection closes after our 413 either way;
            # without framing Tornado does not first try to read the body, and beyond its
            # own cap append a bare 400 to our 413.
            self._drop_framing()
            raise ClientError(413, f"request body is larger than the {limit}-byte limit")

    def _check_framing(self) -> None:
        """400 for a Content-Length or Transfer-Encoding Tornado would refuse anyway.

        Tornado reads the body only after prepare(); refused there, the client gets a bare
        "400 Bad Request" with no JSON.  So we refuse first, the same cases (plus lengths
        over 18 digits, which no body reaches), and drop the framing headers: Tornado then
        reads no body and closes the connection after our answer instead of appending its
        own.  (HTTPServerRequest.headers is the object Tornado frames the body from.)
        """
        headers = self.request.headers
        length = headers.get("Content-Length")
        coding = headers.get("Transfer-Encoding")
        if length is not None and not (length.isascii() and length.isdigit() and len(length) <= 18):
            problem = "invalid Content-Length header"  # isdigit() alone takes "²"; int() "١"
        elif coding is not None and (length is not None or coding.lower() != "chunked"):
            problem = "invalid Transfer-Encoding header (only chunked, without Content-Length)"
        else:
            return
        self._drop_framing()
        raise ClientError(400, problem)

    def _drop_framing(self) -> None:
        for name in ("Content-Length", "Transfer-Encoding"):
            self.request.headers.pop(name, None)

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        if len(self._body) + len(chunk) > self.config.max_body_size:
            self._too_large, self._body = True, bytearray()
            return
        self._body += chunk

    def json_object(self) -> dict:
        """The body as a dict; 413 if it was too large, 400 if it is not a JSON object."""
        if self._too_large:
            raise ClientError(413, f"request body is larger than the "
                                   f"{self.config.max_body_size}-byte limit")
        try:
            body = jsonfmt.loads(bytes(self._body))
        except (ValueError, UnicodeDecodeError) as e:
            raise ClientError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ClientError(400, "body must be a JSON object")
        return body

    def refuse_when_draining(self) -> None:
        if self.application.draining:
            raise ClientError(503, "server is shutting down; retry")


class Flag:
    """asyncio.Event's set(), is_set() and wait() for a flag set once, made for every
    request and rarely waited on: an Event allocates its deque of waiters (600 bytes) when
    made, this a future only when something waits."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: Optional[asyncio.Future] = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def wait(self) -> bool:
        if self._set:
            return True
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        # Shielded: a waiter cancelled (say, by a timeout) leaves the flag usable.
        return await asyncio.shield(self._waiter)


class UpstreamHandler(JSONBodyHandler):
    """A handler relaying one Ollama call; the call is aborted the moment the client leaves."""

    limited = True

    call: Any = None
    client_gone = False
    _left: Optional[Flag] = None

    @property
    def left(self) -> Flag:
        """Set when the client has gone (for waits that should end with it)."""
        if self._left is None:
            self._left = Flag()
            if self.client_gone:
                self._left.set()
        return self._left

    def start_call(self, path: str, body: bytes, on_lines: Any) -> Any:
        """Start the Ollama call (see UpstreamClient.post); a client already gone cancels it."""
        self.call = self.upstreams.post(path, body, on_lines)
        if self.client_gone:
            self.call.abort(UpstreamAborted("client disconnected"))
        return self.call

    def on_finish(self) -> None:
        super().on_finish()
        # Unlink the finished request (handler -> call -> on_lines -> handler, handler <->
        # its event stream), so reference counting frees it at once: see runtime/gc_schedule.py.
        if self.call is not None:
            self.call.release()
        forget_frames(getattr(self.request.connection, "stream", None))  # a client's reset
        events = getattr(self, "events", None)
        if events is not None:
            events.close()
            events.handler = None

    def on_connection_close(self) -> None:
        super().on_connection_close()  # fails a body still being received
        self.client_gone = True
        if self._left is not None:
            self._left.set()
        if self.call is not None and not self.keeps_generating():
            self.call.abort(UpstreamAborted("client disconnected"))

    def keeps_generating(self) -> bool:
        """The client left: True to let the call go on (handlers/resumable.py)."""
        return False

    def end_for_shutdown(self) -> None:
        """The shutdown grace is over: end this request's Ollama call now."""
        if self.call is not None:
            # 503 if it is still before the stream: nginx then retries on another process.
            self.call.abort(UpstreamAborted("chatterd is shutting down; the reply was cut short", 503))

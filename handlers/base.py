"""What every chatterd handler shares: JSON errors, bounded JSON bodies, access to the app."""

import asyncio
from typing import Any, Optional

from tornado.web import HTTPError, RequestHandler, stream_request_body

import jsonfmt
from db.pool import DatabaseUnavailable
from ollama_client import OllamaAborted


class ClientError(HTTPError):
    """Raise to answer `status` with {"error": message}; logged as one line, no traceback."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status)
        self.message = message


def valid_text(value: Any, where: str) -> str:
    """*value* if it is a string PostgreSQL can store, else ClientError(422) naming *where*."""
    if not isinstance(value, str):
        raise ClientError(422, f"{where} must be a string")
    if "\x00" in value:
        raise ClientError(422, f"{where} contains a NUL character, which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(422, f"{where} is not valid Unicode (lone surrogate)") from None
    return value


class BaseHandler(RequestHandler):
    # Set by the chat handlers so the access log can say which conversation and how much.
    app_id: Optional[str] = None
    tokens: Optional[int] = None

    _registered = False

    def prepare(self) -> None:
        # Registered until the request ends (see _release), so a graceful shutdown waits for it.
        self._registered = True
        self.application.request_started(self)
        if self.application.draining and hasattr(self.request.connection, "_disconnect_on_finish"):
            # Close each connection after its answer, so a proxy's next request opens a
            # connection to a process that is staying.  (No public switch for this in Tornado.)
            self.request.connection._disconnect_on_finish = True

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
            self.application.request_done(self)

    @property
    def pool(self) -> Any:
        return self.application.pool

    @property
    def ollama(self) -> Any:
        return self.application.ollama

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
        self.set_header("Content-Type", "application/json")
        self.finish(jsonfmt.dumpb({"error": message}))

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[no-untyped-def]
        if isinstance(value, (ClientError, DatabaseUnavailable)):
            self.error_message = getattr(value, "message", None) or str(value)
            return  # the access log line says what happened
        super().log_exception(typ, value, tb)


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise ClientError(404, f"no such endpoint: {self.request.method} {self.request.path}")


@stream_request_body
class JSONBodyHandler(BaseHandler):
    """A handler whose POST body is a JSON object of bounded size.

    The body is streamed in so an oversized one is refused with 413 without ever
    being held in memory.
    """

    def prepare(self) -> None:
        super().prepare()
        self._body = bytearray()
        self._too_large = False
        limit = self.settings["max_body_size"]
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ClientError(413, f"request body is larger than the {limit}-byte limit")

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        if len(self._body) + len(chunk) > self.settings["max_body_size"]:
            self._too_large, self._body = True, bytearray()
            return
        self._body += chunk

    def json_object(self) -> dict:
        """The body as a dict; 413 if it was too large, 400 if it is not a JSON object."""
        if self._too_large:
            raise ClientError(413, f"request body is larger than the "
                                   f"{self.settings['max_body_size']}-byte limit")
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


class UpstreamHandler(JSONBodyHandler):
    """A handler relaying one Ollama call; the call is aborted the moment the client leaves."""

    call: Any = None
    client_gone = False
    _left: Optional[asyncio.Event] = None

    @property
    def left(self) -> asyncio.Event:
        """Set when the client has gone (for waits that should end with it)."""
        if self._left is None:
            self._left = asyncio.Event()
            if self.client_gone:
                self._left.set()
        return self._left

    def start_call(self, path: str, body: bytes, on_lines: Any) -> Any:
        """Start the Ollama call (see OllamaClient.post); a client already gone cancels it."""
        self.call = self.ollama.post(path, body, on_lines)
        if self.client_gone:
            self.call.abort(OllamaAborted("client disconnected"))
        return self.call

    def on_connection_close(self) -> None:
        super().on_connection_close()  # fails a body still being received
        self.client_gone = True
        if self._left is not None:
            self._left.set()
        if self.call is not None:
            self.call.abort(OllamaAborted("client disconnected"))

    def end_for_shutdown(self) -> None:
        """The shutdown grace is over: end this request's Ollama call now."""
        if self.call is not None:
            # 503 if it is still before the stream: nginx then retries on another process.
            self.call.abort(OllamaAborted("chatterd is shutting down; the reply was cut short", 503))

"""A fake Ollama server: real HTTP on a real socket, programmable to misbehave.

It imitates Ollama's native API (``GET /``, ``/api/version``, ``/api/tags``; ``POST
/api/chat``, ``/api/generate``) closely enough for the official ``ollama`` client, following
the wire format in ``/work/shared/reference/ollama-api.md`` (Ollama v0.12.6+ error framing).
Per model, a `Behavior` makes it slow, failing, stalling or cutting the connection mid-stream.

Standalone, so chatterd can be tried without Ollama (run from the repository root)::

    python -m tests.ollama_double --address 127.0.0.1 --port 11434 --token-delay 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import hashlib
import json
import logging
import re
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import tornado.httpserver
import tornado.iostream
import tornado.testing
import tornado.locks
import tornado.web
import ujson

log = logging.getLogger("ollama_double")

VERSION = "0.12.6"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"  # gin's c.JSON
NDJSON = "application/x-ndjson"
# Ollama's routes we imitate and the methods each accepts; anything else is gin's 404/405.
ROUTES: dict[str, tuple[str, ...]] = {"/": ("GET", "HEAD"), "/api/version": ("GET", "HEAD"),
                                      "/api/tags": ("GET", "HEAD"), "/api/chat": ("POST",),
                                      "/api/generate": ("POST",)}


@dataclass
class Behavior:
    """How the double answers a generation request for one model."""

    reply: str | None = None  # full assistant text; None = default_reply(messages)
    token_delay: float = 0.0  # seconds between streamed lines
    header_delay: float = 0.0  # before the status line (queue + model load + prefill)
    status: int = 200  # != 200: answer at once with this status and {"error": error}
    error: str | None = None  # status 200: an {"error"} line after `error_after` chunks
    error_after: int = 0
    stall_after: int | None = None  # then silence until the peer closes the connection
    reset_after: int | None = None  # then abort the TCP connection with RST
    close_after: int | None = None  # then close cleanly (FIN) mid chunked body
    omit_done: bool = False  # end the body normally but without the done:true line
    final_content: str = ""  # text carried by the done:true line itself (Ollama may do this)
    # Hostile upstreams (real Ollama does none of these):
    raw_chars: str = ""  # these characters go out raw inside JSON strings, not escaped
    interim: int | None = None  # an informational status (e.g. 103) before the real one
    location: str = "/"  # the Location of a 3xx `status` (GET / answers 200 here)
    content_value: Callable[[str], Any] | None = None  # message.content = content_value(piece)
    eval_count: Any = None  # the done line's eval_count instead of the real count
    max_ctx: int | None = None  # the model's own context: a larger num_ctx is capped to it
    # Tool calls, as Ollama sends them: each call whole in one line
    # (message.tool_calls = [{"function": {"name", "arguments": {...}}}], content ""), after
    # the reply's text (if any), then the done line.  A list: called when the conversation's
    # last message is not a tool result (so the model answers in text once the results are
    # in); a callable(messages) -> list or None decides per request.
    tool_calls: Any = None


@dataclass
class RecordedRequest:
    """One request as the double saw it; timestamps are time.monotonic()."""

    path: str
    method: str
    body: dict | None
    raw: bytes
    received_at: float
    first_byte_at: float | None = None
    finished_at: float | None = None  # the response was fully written
    closed_at: float | None = None  # the peer closed before the response finished
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    chunks_sent: int = 0  # content chunks written (the done/error lines do not count)
    truncated: int = 0  # messages the double dropped because the prompt exceeded num_ctx
    lines_sent: list = field(default_factory=list)  # every NDJSON line written, as bytes
    headers: dict = field(default_factory=dict)  # the request's headers (names as sent)

    @property
    def messages(self) -> list | None:
        """The message list a /api/chat request carried, exactly as sent (None: none)."""
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        return messages if isinstance(messages, list) else None


def go_json(obj: Any) -> str:
    """Serialize like Go's encoding/json: compact, and HTML-safe escapes.

    The escaped characters can only occur inside JSON strings, so replacing them in the
    output is safe.
    """
    text = ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def go_time(ns: int | None = None) -> str:
    """UTC time as Go's RFC3339Nano prints it: 0-9 fraction digits, trailing zeros trimmed."""
    seconds, frac = divmod(time.time_ns() if ns is None else ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def default_reply(messages: list[dict]) -> str:
    """The deterministic reply to a conversation.

    It quotes the last user message and counts the messages so tests can tell turns
    apart, and carries runs of spaces, a tab, blank lines and ``<``/``&`` so a test can
    prove text is stored verbatim and the Go escaping is decoded.
    """
    last = next((m.get("content") for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), "")
    # Leading and trailing whitespace too: a reply stored .strip()ped must not pass.
    return (f" Reply #{len(messages)} to: {last or ''}\n\n"
            "```python\ndef f(x):\n    return  x * 2\n```\n\n"
            "Two  spaces,\ttab & <tag>.\n")


DEFAULT_NUM_CTX = 4096  # Ollama's default context below 24 GiB of VRAM (ollama-api.md §5.3)
GENERATION_PROMPT = 3  # the tokens of the assistant header that ends every prompt


def message_tokens(m: Any) -> int:
    """What one message costs in the double's prompt: its word pieces (as a reply of that
    text is counted in eval_count) plus 4 of template (header and end-of-turn), plus its
    tool calls' JSON at a token per 4 characters.  Deterministic, so tests know it."""
    if not isinstance(m, dict):
        return 0
    count = 4 + len(split_tokens(str(m.get("content") or "")))
    if m.get("tool_calls"):
        count += len(go_json(m["tool_calls"])) // 4
    return count


def prompt_tokens(messages: list) -> int:
    """The double's prompt_eval_count for these messages (before any truncation)."""
    return sum(message_tokens(m) for m in messages) + GENERATION_PROMPT


def fit_context(messages: list, num_ctx: int) -> tuple[list, int]:
    """What Ollama's chatPrompt does with a prompt larger than num_ctx (truncate: true):
    drop the oldest non-system messages, always keeping the last.  Returns (the messages
    kept, how many were dropped)."""
    kept = list(messages)
    dropped = 0
    while prompt_tokens(kept) > num_ctx:
        i = next((i for i, m in enumerate(kept[:-1])
                  if not (isinstance(m, dict) and m.get("role") == "system")), None)
        if i is None:
            break
        del kept[i]
        dropped += 1
    return kept, dropped


def tool_call(name: str, **arguments: Any) -> dict:
    """One call in Ollama's documented form: {"function": {"name", "arguments": {...}}}."""
    return {"function": {"name": name, "arguments": arguments}}


def calls_due(behavior: Behavior, messages: list) -> list | None:
    """The tool calls the double answers *messages* with, if any."""
    if behavior.tool_calls is None:
        return None
    if callable(behavior.tool_calls):
        return behavior.tool_calls(messages) or None
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "tool":
        return None
    return list(behavior.tool_calls) or None


def split_tokens(text: str) -> list[str]:
    """Cut text into word-sized chunks that keep their leading whitespace.

    Every character lands in exactly one piece, so ``"".join(split_tokens(t)) == t``.
    """
    return re.findall(r"\s*\S+|\s+", text)


def model_key(name: str) -> str:
    """Ollama matches names case-insensitively and treats a missing tag as ':latest'."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


# Request fields whose JSON type Go's decoder checks, with Go's name for the type.
_GO_FIELDS = {"model": (str, "string"), "prompt": (str, "string"), "stream": (bool, "bool"),
              "messages": (list, "[]api.Message"), "options": (dict, "map[string]interface {}")}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else \
        {str: "string", list: "array", dict: "object"}.get(type(value), "value")


def decode_request(raw: bytes, struct_name: str) -> tuple[dict | None, str | None]:
    """Decode a body as gin's ShouldBindJSON would: (the JSON object or None, Go-like error)."""
    text = raw.decode("utf-8", errors="replace").lstrip(" \t\r\n")  # Go: bad UTF-8 -> U+FFFD
    if not text:
        return None, "missing request body"  # json.Decoder returned io.EOF
    try:
        req = ujson.loads(text)
    except ValueError:
        try:  # Go decodes only the first value and ignores trailing bytes; ujson refuses them
            req = json.JSONDecoder().raw_decode(text)[0]
        except json.JSONDecodeError as exc:
            if exc.pos >= len(text):
                return None, "unexpected EOF"
            char = {"'": "\\'", '"': '"'}.get(text[exc.pos]) or json.dumps(text[exc.pos], ensure_ascii=False)[1:-1]
            return None, f"invalid character '{char}' looking for beginning of value"
    if req is None:
        return None, None  # `null` decodes to the zero request; the model check rejects it
    if not isinstance(req, dict):
        return None, f"json: cannot unmarshal {_json_kind(req)} into Go value of type api.{struct_name}"
    for name, (kind, go_type) in _GO_FIELDS.items():
        if req.get(name) is not None and not isinstance(req[name], kind):
            return req, (f"json: cannot unmarshal {_json_kind(req[name])} into Go struct field "
                         f"{struct_name}.{name} of type {go_type}")
    return req, None


class _Handler(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

    def initialize(self, double: OllamaDouble) -> None:
        # Recorded here, not in prepare(), so on_connection_close always finds it.
        self.double = double
        self.rec = RecordedRequest(self.request.path, self.request.method or "", None,
                                   self.request.body or b"", time.monotonic(),
                                   headers=dict(self.request.headers.get_all()))
        double.requests.append(self.rec)
        double._arrival.notify_all()
        self._gone = asyncio.Event()  # the connection is closed, for whatever reason
        self._raw_chars = ""  # Behavior.raw_chars of the answer being written
        self._closing_ourselves = False

    def set_default_headers(self) -> None:
        # Go sends no Server header, and every answer here sets its own Content-Type.
        self.clear_header("Server")
        self.clear_header("Content-Type")

    def compute_etag(self) -> str | None:
        return None  # gin sends no ETag, and a 304 would be wrong

    def on_connection_close(self) -> None:
        if not (self._closing_ourselves or self.double._stopping or self.rec.finished_at):
            self.rec.closed_at = time.monotonic()
            self.rec.closed.set()
        self._gone.set()
        super().on_connection_close()

    async def get(self) -> None:
        done = asyncio.get_running_loop().create_future()
        self.double._active.add(done)  # so stop() can wait for handlers to unwind
        try:
            await self._route()
        finally:
            self.double._active.discard(done)
            done.set_result(None)

    head = post = put = delete = patch = options = get

    async def _route(self) -> None:
        path = self.request.path
        if path not in ROUTES:
            return await self._send(404, "404 page not found", TEXT)
        if self.request.method not in ROUTES[path]:
            return await self._send(405, "405 method not allowed", TEXT)
        if path == "/":
            return await self._send(200, "Ollama is running", TEXT)
        if path == "/api/version":
            return await self._send(200, go_json({"version": VERSION}), JSON)
        if path == "/api/tags":
            return await self._send(200, go_json({"models": self.double._tags()}), JSON)
        await self._generate(chat=path == "/api/chat")

    async def _send(self, status: int, body: str, content_type: str) -> None:
        """One whole answer; Tornado sets Content-Length since nothing was flushed."""
        self.set_status(status)
        self.set_header("Content-Type", content_type)
        self.write(body)
        self.rec.first_byte_at = time.monotonic()
        await self._finish()

    async def _finish(self) -> None:
        try:
            await self.finish()
        except tornado.iostream.StreamClosedError:
            self._gone.set()
            return
        self.rec.finished_at = time.monotonic()

    def _error(self, status: int, message: str) -> Any:
        return self._send(status, go_json({"error": message}), JSON)

    async def _pause(self, seconds: float) -> bool:
        """Sleep, but wake as soon as the connection goes; True if it is gone."""
        if seconds > 0 and not self._gone.is_set():
            try:
                await asyncio.wait_for(self._gone.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return self._gone.is_set()

    def _drop(self, reset: bool) -> None:
        """Close the TCP connection mid-response: RST if reset, else a clean FIN."""
        self._closing_ourselves = True
        stream = self.request.connection.stream  # type: ignore[union-attr]
        if stream.closed():  # the peer left first: nothing to drop
            self._gone.set()
            return
        if reset:  # linger on with a zero timeout makes close() send RST
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.close()
        # Tornado's automatic finish() after we return sees the closed stream and writes nothing.

    async def _line(self, obj: dict, content: bool = False) -> bool:
        """Write one NDJSON line and wait until it is sent (back-pressure)."""
        if self._gone.is_set():
            return False
        text = go_json(obj)
        for char in self._raw_chars:  # the reply text holds no backslashes of its own
            text = text.replace(go_json(char)[1:-1], char)
        line = text.encode()
        self.rec.lines_sent.append(line)
        self.write(line + b"\n")
        if self.rec.first_byte_at is None:
            self.rec.first_byte_at = time.monotonic()  # headers go out with the first line
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            self._gone.set()
            return False
        self.rec.chunks_sent += content
        return True

    async def _generate(self, chat: bool) -> None:
        req, err = decode_request(self.request.body, "ChatRequest" if chat else "GenerateRequest")
        self.rec.body = req
        if err:
            return await self._error(400, err)
        req = req or {}
        model = req.get("model") or ""
        if not model:  # the two endpoints really differ here
            return await (self._error(400, "model is required") if chat
                          else self._error(404, "model '' not found"))
        behavior = self.double._behavior_for(model)
        if behavior is None:
            return await self._error(404, f"model '{model}' not found")
        if chat:
            messages = req.get("messages") or []
            options = req.get("options") or {}
            num_ctx = options.get("num_ctx") or DEFAULT_NUM_CTX
            if behavior.max_ctx is not None and isinstance(num_ctx, (int, float)):
                num_ctx = min(num_ctx, behavior.max_ctx)
            if isinstance(num_ctx, (int, float)) and prompt_tokens(messages) > num_ctx:
                if req.get("truncate") is False:
                    return await self._error(400, "the prompt is longer than the context length "
                                             "currently available to the model; shorten the "
                                             "prompt, adjust the context length in settings, or "
                                             "use a model with a longer context length")
                messages, self.rec.truncated = fit_context(messages, int(num_ctx))
        else:
            messages = [{"role": "user", "content": req.get("prompt") or ""}]
        stream = req.get("stream") is not False  # absent or null means stream
        await self._answer(behavior, model, chat, stream, messages)

    async def _answer(self, b: Behavior, model: str, chat: bool, stream: bool,
                      messages: list) -> None:
        start = time.monotonic_ns()
        calls = calls_due(b, messages) if chat else None
        if calls:  # a model calling tools usually says nothing else
            text = b.reply or ""
        else:
            text = b.reply if b.reply is not None else default_reply(messages)
        pieces = split_tokens(text)
        eval_count = len(pieces) + (len(go_json(calls)) // 4 if calls else 0)
        self._raw_chars = b.raw_chars

        def chunk(content: Any) -> dict:
            key, value = ("message", {"role": "assistant", "content": content}) if chat \
                else ("response", content)
            return {"model": model, "created_at": go_time(), key: value, "done": False}

        if await self._pause(b.header_delay):
            return
        if b.interim is not None:  # Tornado cannot send a 1xx itself: nothing is written yet
            self.request.connection.stream.write(  # type: ignore[union-attr]
                b"HTTP/1.1 %d Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" % b.interim)
        if b.status in (204, 304) or 300 <= b.status < 400:
            self.set_status(b.status)  # no body (Go's http.Redirect writes none for a POST)
            if b.status != 204 and b.status != 304:
                self.set_header("Location", b.location)
            self.rec.first_byte_at = time.monotonic()
            return await self._finish()
        if b.status != 200:
            # Errors raised inside Ollama's streamResponse carry no charset (§3.3).
            return await self._send(b.status, go_json({"error": b.error or "an error was "
                                    "encountered while running the model"}),
                                    "application/json" if stream else JSON)
        if stream:
            self.set_header("Content-Type", NDJSON)
        gen_start = time.monotonic_ns()
        for k in range(len(pieces) + 1):  # step k: k content chunks are already out
            if k and await self._pause(b.token_delay):
                return
            action = self._due(b, k, len(pieces))
            if action == "error":
                # Non-streaming, or before any output (Ollama >= 0.12.6): a real status.
                if not stream or k == 0:
                    return await self._error(500, b.error or "")
                await self._line({"error": b.error})
                break
            if action == "stall":
                await self._gone.wait()  # set only by on_connection_close (or stop())
                return
            if action in ("reset", "close"):
                return self._drop(reset=action == "reset")
            if k < len(pieces):
                piece = pieces[k] if b.content_value is None else b.content_value(pieces[k])
                if stream and not await self._line(chunk(piece), content=True):
                    return
            elif not stream:
                whole = chunk(text)
                if calls:
                    whole["message"]["tool_calls"] = calls
                final = self._final(whole, b, messages, eval_count, start, gen_start)
                return await self._send(200, go_json(final), JSON)
            else:
                if calls:  # each call whole, in one line of its own
                    line = chunk("")
                    line["message"]["tool_calls"] = calls
                    if not await self._line(line, content=True):
                        return
                if b.omit_done:
                    break
                final = self._final(chunk(b.final_content), b, messages, eval_count, start,
                                    gen_start)
                if not await self._line(final):
                    return
        await self._finish()

    @staticmethod
    def _due(b: Behavior, sent: int, total: int) -> str | None:
        """Which programmed failure, if any, happens once `sent` chunks are out."""
        for name, after in (("error", b.error_after if b.error is not None else None),
                            ("stall", b.stall_after), ("reset", b.reset_after),
                            ("close", b.close_after)):
            if after is not None and sent >= min(after, total):
                return name
        return None

    @staticmethod
    def _final(obj: dict, b: Behavior, messages: list, eval_count: int, start: int,
               gen_start: int) -> dict:
        now = time.monotonic_ns()
        prompt_count = prompt_tokens(messages)
        load = int(b.header_delay * 1e9) + 1_000_000
        prompt_eval = prompt_count * 250_000 + 1
        eval_duration = max(now - gen_start, 1)
        metrics = {"total_duration": max(now - start, load + prompt_eval + eval_duration),
                   "load_duration": load, "prompt_eval_count": prompt_count,
                   "prompt_eval_duration": prompt_eval,
                   "eval_count": eval_count if b.eval_count is None else b.eval_count,
                   "eval_duration": eval_duration}
        obj.update(done=True, done_reason="stop")
        obj.update((k, v) for k, v in metrics.items() if v)  # Go's omitempty drops zeros
        return obj


class OllamaDouble:
    """The fake server. Create it, call `listen()` inside a running IOLoop, `await stop()`."""

    def __init__(self, *, known_models: Iterable[str] = ("llama3.2", "llama3.2:latest", "qwen3:8b",
                                                          "gemma3:12b", "tinyllama"),
                 accept_any_model: bool = False, default: Behavior | None = None) -> None:
        self.known_models: list[str] = list(known_models)
        self.accept_any_model = accept_any_model
        self.default = default or Behavior()  # for known models without their own Behavior
        self.requests: list[RecordedRequest] = []
        self._arrival = tornado.locks.Condition()
        self._behaviors: dict[str, Behavior] = {}
        self._active: set[asyncio.Future] = set()
        self._stopping = False
        self._server: tornado.httpserver.HTTPServer | None = None
        self._address = "127.0.0.1"
        self._port = 0
        self.app = tornado.web.Application([(r".*", _Handler, {"double": self})],
                                           log_function=self._log)

    def listen(self, port: int = 0, address: str = "127.0.0.1") -> int:
        """Start serving on the current IOLoop; port 0 picks a free one. Returns the port."""
        self._server = tornado.httpserver.HTTPServer(self.app)
        if port == 0:
            sock, port = tornado.testing.bind_unused_port(address=address)
            self._server.add_sockets([sock])
        else:
            self._server.listen(port, address)
        self._address, self._port, self._stopping = address, port, False
        return port

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self._address, self._address)
        return f"http://{f'[{host}]' if ':' in host else host}:{self._port}"

    def behave(self, model: str, **fields: Any) -> Behavior:
        """Program `model` (which becomes known); unset fields come from `self.default`."""
        behavior = dataclasses.replace(self.default, **fields)
        self._behaviors[model_key(model)] = behavior
        if model not in self.known_models:
            self.known_models.append(model)
        return behavior

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/api/chat"]

    async def wait_for_chats(self, count: int = 1, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until `count` POST /api/chat requests have arrived; return them all."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.chat_requests()) < count:
            remaining = datetime.timedelta(seconds=deadline - asyncio.get_running_loop().time())
            if not await self._arrival.wait(timeout=remaining):
                raise TimeoutError(f"{count} chat request(s) did not arrive within {timeout} s")
        return self.chat_requests()

    async def stop(self) -> None:
        """Stop listening, drop every connection, and let in-flight handlers unwind."""
        if self._server is None:
            return
        self._stopping = True
        self._server.stop()
        await self._server.close_all_connections()  # wakes handlers via on_connection_close
        if self._active:
            await asyncio.wait(list(self._active), timeout=5)
        self._server = None

    def _behavior_for(self, model: str) -> Behavior | None:
        key = model_key(model)
        if key in self._behaviors:
            return self._behaviors[key]
        known = {model_key(m) for m in self.known_models}
        return self.default if key in known or self.accept_any_model else None

    def _tags(self) -> list[dict]:
        models = []
        for name in dict.fromkeys(model_key(m) for m in self.known_models):
            digest = hashlib.sha256(name.encode()).hexdigest()
            family = re.sub(r"[\d.]+$", "", name.split(":")[0].rsplit("/", 1)[-1]) or "llama"
            models.append({
                "name": name, "model": name, "modified_at": "2025-10-20T09:15:02.123456789+02:00",
                "size": 1_000_000_000 + int(digest[:6], 16), "digest": digest,
                "details": {"parent_model": "", "format": "gguf", "family": family,
                            "families": [family], "parameter_size": "3.2B",
                            "quantization_level": "Q4_K_M"}})
        return models

    def _log(self, handler: tornado.web.RequestHandler) -> None:
        body = getattr(handler, "rec", None) and handler.rec.body  # type: ignore[attr-defined]
        model = f" model={body.get('model')!r}" if isinstance(body, dict) else ""
        log.info("%d %s %s%s %.1fms", handler.get_status(), handler.request.method,
                 handler.request.uri, model, 1000 * handler.request.request_time())


def parse_behavior(text: str) -> tuple[str, dict]:
    """"MODEL=JSON" (a --behave argument) -> (model, Behavior fields)."""
    model, sep, fields = text.partition("=")
    if not sep or not model:
        raise argparse.ArgumentTypeError(f"expected MODEL=JSON, not {text!r}")
    try:
        decoded = json.loads(fields)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{model}: {e}") from None
    known = {f.name for f in dataclasses.fields(Behavior)}
    if not isinstance(decoded, dict) or set(decoded) - known:
        raise argparse.ArgumentTypeError(f"{model}: a JSON object of Behavior fields ({', '.join(sorted(known))})")
    return model, decoded


async def serve(address: str, port: int, token_delay: float, accept_any_model: bool,
                behaviors: Iterable[tuple[str, dict]] = ()) -> None:
    """Run a double until SIGINT or SIGTERM."""
    double = OllamaDouble(accept_any_model=accept_any_model,
                          default=Behavior(token_delay=token_delay))
    for model, fields in behaviors:
        double.behave(model, **fields)
    double.listen(port, address)
    log.info("Ollama double listening on %s", double.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await double.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake Ollama server for trying chatterd.")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--token-delay", type=float, default=0.05,
                        help="seconds between streamed chunks")
    parser.add_argument("--accept-any-model", action=argparse.BooleanOptionalAction, default=True,
                        help="answer for any model name, not only the known ones")
    parser.add_argument("--behave", metavar="MODEL=JSON", type=parse_behavior, action="append",
                        default=[], help='program one model, e.g. slow=\'{"token_delay": 0.5}\' '
                        "(fields of Behavior; repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    asyncio.run(serve(args.address, args.port, args.token_delay, args.accept_any_model,
                      args.behave))
    return 0


if __name__ == "__main__":
    sys.exit(main())

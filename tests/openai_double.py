"""A fake OpenAI-compatible server (llama.cpp / vLLM style): real HTTP on 127.0.0.1.

`GET /v1/models` lists its models; `POST /v1/chat/completions` streams SSE chunks as a
per-model `Script` says, including what a small real model will not produce: tool-call
deltas in fragments (with id/name repeated, as some servers do), reasoning_content, an
error chunk mid-stream, keepalive comments, a missing [DONE], 5xx/429 before the stream,
or a stall until the client goes.  Every request is recorded (body and headers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import tornado.httpserver
import tornado.iostream
import tornado.testing
import tornado.web
import ujson


@dataclass
class Script:
    reply: str = "Hello from the OpenAI double."
    status: int = 200  # != 200: answer at once with {"error": {...}}
    error: str = "the server is overloaded"
    reasoning: str = ""  # sent as reasoning_content deltas before the reply
    reasoning_field: str = "reasoning_content"  # or "reasoning" (vLLM, Ollama's /v1)
    tool_calls: Optional[list[tuple[str, str]]] = None  # (name, arguments JSON) each
    fragment: int = 4  # characters of arguments per delta
    repeat_id_name: bool = False  # every fragment repeats id, type and function.name
    interleave: bool = False  # fragments of the calls alternate
    keepalive: bool = False  # a ": keepalive" comment before every chunk
    error_after: Optional[int] = None  # data: {"error"} after this many content chunks
    send_done: bool = True  # the final `data: [DONE]`
    send_finish: bool = True  # the chunk with finish_reason
    finish_reason: Optional[str] = None  # default: stop, or tool_calls with tool calls
    token_delay: float = 0.0
    stall: bool = False  # after the first content chunk, silence until the client goes
    crlf: bool = False  # lines end with CRLF


@dataclass
class Recorded:
    path: str
    body: Any
    headers: dict
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False


def words(text: str) -> list[str]:
    out, word = [], ""
    for ch in text:
        if ch == " " and word:
            out.append(word)
            word = ""
        word += ch
    return out + ([word] if word else [])


class _Handler(tornado.web.RequestHandler):
    def initialize(self, double: "OpenAIDouble") -> None:
        self.double = double
        self.gone = asyncio.Event()
        self.rec: Optional[Recorded] = None

    def on_connection_close(self) -> None:
        self.gone.set()
        if self.rec is not None and not self.rec.finished:
            self.rec.closed.set()

    def check_xsrf_cookie(self) -> None:
        pass

    def get(self) -> None:
        if self.request.path.rstrip("/") != "/v1/models":
            self.set_status(404)
            return self.finish({"error": {"message": "not found", "type": "not_found_error"}})
        self.double.model_listings += 1
        if self.double.listing_status != 200:
            self.set_status(self.double.listing_status)
            return self.finish({"error": {"message": "listing failed"}})
        self.finish({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1, "owned_by": "double"}
            for m in self.double.models]})

    async def post(self) -> None:
        body = ujson.loads(self.request.body or b"null")
        self.rec = Recorded(self.request.path, body, dict(self.request.headers))
        self.double.requests.append(self.rec)
        if self.request.path.rstrip("/") != "/v1/chat/completions":
            self.set_status(404)
            return self.finish({"error": {"message": "not found"}})
        model = body.get("model")
        script = self.double.scripts.get(model)
        if script is None:
            script = self.double.default if model in self.double.models else None
        if script is None:
            self.set_status(404)
            return self.finish({"error": {"message": f"model '{model}' not found",
                                          "type": "not_found_error", "param": None,
                                          "code": "model_not_found"}})
        if script.status != 200:
            self.set_status(script.status)
            return self.finish({"error": {"message": script.error, "type": "server_error",
                                          "param": None, "code": None}})
        await self._stream(script, body)

    async def _write(self, data: bytes) -> bool:
        if self.gone.is_set():
            return False
        self.write(data)
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            return False
        return True

    async def _stream(self, s: Script, body: dict) -> None:
        self.set_header("Content-Type", "text/event-stream")
        end = b"\r\n" if s.crlf else b"\n"
        cid, created, model = "chatcmpl-double", int(time.time()), body.get("model")

        def event(choices: list, usage: Any = None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return b"data: " + ujson.dumps(obj).encode() + end + end

        def delta(d: dict, finish: Optional[str] = None) -> bytes:
            return event([{"index": 0, "delta": d, "finish_reason": finish}])

        chunks: list[bytes] = [delta({"role": "assistant", "content": ""})]
        for piece in words(s.reasoning):
            chunks.append(delta({s.reasoning_field: piece}))
        content = words(s.reply)
        for piece in content:
            chunks.append(delta({"content": piece}))
        if s.tool_calls:
            chunks.extend(delta({"tool_calls": [d]}) for d in self._tool_deltas(s))
        finish = s.finish_reason or ("tool_calls" if s.tool_calls else "stop")
        if s.send_finish:
            chunks.append(delta({}, finish))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            chunks.append(event([], {"prompt_tokens": 11, "completion_tokens": len(content),
                                     "total_tokens": 11 + len(content)}))
        content_sent = 0
        for i, chunk in enumerate(chunks):
            if i and s.token_delay:
                await asyncio.sleep(s.token_delay)
            if s.error_after is not None and content_sent >= s.error_after and i > 0:
                await self._write(b'data: {"error": {"message": "' + s.error.encode() +
                                  b'", "type": "server_error", "code": 500}}' + end + end)
                break
            if s.keepalive and not await self._write(b": keepalive" + end + end):
                return
            if not await self._write(chunk):
                return
            if b'"content"' in chunk and i > 0:
                content_sent += 1
            if s.stall and content_sent:
                await self.gone.wait()
                return
        else:
            if s.send_done:
                await self._write(b"data: [DONE]" + end + end)
        self.rec.finished = True  # type: ignore[union-attr]

    @staticmethod
    def _tool_deltas(s: Script) -> list[dict]:
        per_call: list[list[dict]] = []
        for index, (name, arguments) in enumerate(s.tool_calls or []):
            call_id = f"call_{index}_double"
            head = {"index": index, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}
            pieces = [arguments[i:i + s.fragment] for i in range(0, len(arguments), s.fragment)]
            deltas = [head]
            for piece in pieces:
                d: dict = {"index": index, "function": {"arguments": piece}}
                if s.repeat_id_name:
                    d = {"index": index, "id": call_id, "type": "function",
                         "function": {"name": name, "arguments": piece}}
                deltas.append(d)
            per_call.append(deltas)
        if not s.interleave:
            return [d for deltas in per_call for d in deltas]
        out: list[dict] = []
        for group in range(max(len(d) for d in per_call)):
            out.extend(d[group] for d in per_call if group < len(d))
        return out


class OpenAIDouble:
    """Create, `listen()` on a running IOLoop, `await stop()`."""

    def __init__(self, models: Iterable[str] = ("gpt-double",), default: Optional[Script] = None):
        self.models = list(models)
        self.default = default or Script()
        self.scripts: dict[str, Script] = {}
        self.requests: list[Recorded] = []
        self.model_listings = 0
        self.listing_status = 200
        self.port = 0
        self._server: Optional[tornado.httpserver.HTTPServer] = None
        self.app = tornado.web.Application([(r".*", _Handler, {"double": self})])

    def listen(self) -> int:
        sock, self.port = tornado.testing.bind_unused_port()
        self._server = tornado.httpserver.HTTPServer(self.app)
        self._server.add_sockets([sock])
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, model: str, **fields: Any) -> Script:
        s = self.scripts[model] = dataclasses.replace(self.default, **fields)
        if model not in self.models:
            self.models.append(model)
        return s

    def chats(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.rstrip("/") == "/v1/chat/completions"]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None

"""The OpenAI-compatible dialect (llama.cpp's server, vLLM, LM Studio, hosted APIs), both ways.

Upstream side (chatterd is the client): `OpenAIClient.post("/api/chat", body, on_lines)`
takes an Ollama /api/chat (or /api/generate) body, sends the equivalent
POST {base}/chat/completions with `stream: true` and `stream_options.include_usage`, and
hands `on_lines` Ollama-shaped NDJSON lines, so handlers cannot tell which dialect served
them.  `OpenAICall` has OllamaCall's interface (it is one, with another body parser):

* each `data: {chunk}` becomes one Ollama line (`message.content`, `message.thinking` from
  `reasoning_content`/`reasoning`); tool-call deltas are accumulated by `index` (id and
  name once, arguments in fragments; an id/name repeated in every fragment is not
  concatenated) and delivered whole in one line, as Ollama does;
* `finish_reason` and the usage chunk become the final `done: true` line (`done_reason`
  "length" stays, anything else is "stop"; `prompt_eval_count`/`eval_count` from usage),
  sent at `data: [DONE]`, or at the end of a stream that had its finish but no [DONE];
* `data: {"error": ...}` (or llama.cpp's old `error:` field) becomes Ollama's `{"error"}`
  line; a stream that ends with neither finish nor [DONE] is an error; `:` comments
  (keepalives) and `event:`/`id:` lines are skipped;
* with on_lines None (`"stream": false`), `body` is one Ollama JSON object, as Ollama's.

Client side (chatterd is the server, handlers/openai_api.py): `openai_to_ollama_request`
and `OllamaToOpenAI` translate the other way.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit, unquote

import jsonfmt
from ollama_client import (LinesCallback, OllamaBroken, OllamaCall, OllamaClient, OllamaError,
                           OllamaHTTPError)

_LS, _PS = "\u2028".encode(), "\u2029".encode()

# Ollama options with an OpenAI request field of their own.
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
                 "num_predict": "max_tokens", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p"}


def encode_line(obj: Any) -> bytes:
    """One JSON line that no line-based framing can split (see jsonfmt.one_line)."""
    out = jsonfmt.dumpb(obj)
    if _LS in out or _PS in out:  # ujson leaves these raw; they end a line for JavaScript
        out = out.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
    return out


_clock_second = -1
_clock_prefix = ""


def go_time() -> str:
    """Now, in UTC, as Ollama writes created_at (RFC 3339, fraction trimmed)."""
    global _clock_second, _clock_prefix
    ns = time.time_ns()
    second, frac = divmod(ns, 1_000_000_000)
    if second != _clock_second:
        _clock_second = second
        _clock_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    digits = f"{frac:09d}".rstrip("0")
    return f"{_clock_prefix}.{digits}Z" if digits else f"{_clock_prefix}Z"


# -- Ollama request -> OpenAI request --------------------------------------------------------

def _openai_message(m: dict, pending_ids: list[str], counter: list[int]) -> dict:
    role = m.get("role")
    out: dict[str, Any] = {"role": role, "content": m.get("content") or ""}
    images = m.get("images")
    if images and isinstance(images, list):
        parts: list[dict] = [{"type": "text", "text": out["content"]}] if out["content"] else []
        for image in images:
            if isinstance(image, str):
                url = image if image.startswith("data:") else f"data:image/png;base64,{image}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
        out["content"] = parts
    calls = m.get("tool_calls")
    if role == "assistant" and calls and isinstance(calls, list):
        out_calls = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            arguments = function.get("arguments", {})
            counter[0] += 1
            call_id = call.get("id") or f"call_{counter[0]}"
            pending_ids.append(call_id)
            out_calls.append({"id": call_id, "type": "function",
                              "function": {"name": function.get("name", ""),
                                           "arguments": arguments if isinstance(arguments, str)
                                           else jsonfmt.dumps(arguments)}})
        if out_calls:
            out["tool_calls"] = out_calls
            if not out["content"]:
                out["content"] = None
    if role == "tool":
        call_id = m.get("tool_call_id")
        if call_id and call_id in pending_ids:
            pending_ids.remove(call_id)
        elif not call_id:
            call_id = pending_ids.pop(0) if pending_ids else f"call_{counter[0] + 1}"
        out["tool_call_id"] = call_id
    return out


def ollama_to_openai_request(path: str, body: dict) -> dict:
    """The /chat/completions body for an Ollama /api/chat or /api/generate *body*."""
    if path == "/api/generate":
        messages = []
        if isinstance(body.get("system"), str) and body["system"]:
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": body.get("prompt") or "",
                         **({"images": body["images"]} if body.get("images") else {})})
    else:
        messages = body.get("messages") or []
    pending: list[str] = []
    counter = [0]
    out: dict[str, Any] = {
        "model": body.get("model"),
        "messages": [_openai_message(m, pending, counter) for m in messages if isinstance(m, dict)],
        "stream": True, "stream_options": {"include_usage": True}}
    options = body.get("options")
    if isinstance(options, dict):
        for name, field in OPTION_FIELDS.items():
            if options.get(name) is not None:
                out[field] = options[name]
    if body.get("tools"):
        out["tools"] = body["tools"]
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "response", "schema": fmt}}
    think = body.get("think")
    if isinstance(think, str) and think:
        out["reasoning_effort"] = think
    return out


# -- OpenAI stream -> Ollama lines ------------------------------------------------------------

class ChunkTranslator:
    """Turns the SSE lines of one OpenAI chat stream into Ollama NDJSON lines."""

    __slots__ = ("model", "key", "label", "calls", "finish", "usage", "done", "failed", "event")

    def __init__(self, model: str, generate: bool = False, label: str = "upstream") -> None:
        self.model = model
        self.key = "response" if generate else "message"
        self.label = label
        self.calls: dict[int, dict] = {}  # index -> {"id", "name", "arguments": [fragments]}
        self.finish: Optional[str] = None
        self.usage: Optional[dict] = None
        self.done = False  # [DONE] seen, the final line sent
        self.failed = False  # an error line sent
        self.event = ""

    def _line(self, content: str, thinking: Optional[str] = None,
              tool_calls: Optional[list] = None) -> bytes:
        if self.key == "message":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            return encode_line({"model": self.model, "created_at": go_time(), "message": message,
                                "done": False})
        line: dict[str, Any] = {"model": self.model, "created_at": go_time(), "response": content}
        if thinking:
            line["thinking"] = thinking
        if tool_calls:
            line["tool_calls"] = tool_calls
        line["done"] = False
        return encode_line(line)

    def _error(self, message: Any) -> bytes:
        self.failed = True
        if isinstance(message, dict):
            message = message.get("message") or jsonfmt.dumps(message)
        return encode_line({"error": f"{self.label}: {message or 'an error occurred during streaming'}"})

    def feed(self, lines: list[bytes]) -> list[bytes]:
        """Ollama lines for these SSE lines (empty lines are already gone)."""
        out: list[bytes] = []
        for line in lines:
            if self.done or self.failed:
                break
            if line.startswith(b"data:"):
                data = line[6:] if line[5:6] == b" " else line[5:]
                if data.startswith(b"[DONE]"):
                    out.extend(self._final())
                    continue
                try:
                    chunk = jsonfmt.loads(data)
                except ValueError:
                    out.append(self._error(f"sent a data line that is not JSON: {data[:80]!r}"))
                    continue
                if not isinstance(chunk, dict):
                    out.append(self._error(f"sent a data line that is not a JSON object: {data[:80]!r}"))
                    continue
                if "error" in chunk or self.event == "error":
                    out.append(self._error(chunk.get("error", chunk)))
                    continue
                self._chunk(chunk, out)
            elif line.startswith(b":"):
                continue  # a comment: keepalive
            elif line.startswith(b"event:"):
                self.event = line[6:].strip().decode("utf-8", "replace")
            elif line.startswith(b"error:"):  # llama.cpp before Sept 2025: an `error:` field
                text = line[6:].strip()
                try:
                    error = jsonfmt.loads(text)
                except ValueError:
                    error = text.decode("utf-8", "replace")
                out.append(self._error(error.get("error", error) if isinstance(error, dict) else error))
            # id:, retry: and unknown fields are ignored, as SSE says
        return out

    def _chunk(self, chunk: dict, out: list[bytes]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return
        choice = choices[0]
        if not isinstance(choice, dict):
            return
        delta = choice.get("delta") or choice.get("message") or {}
        if isinstance(delta, dict):
            content = delta.get("content")
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if (content and isinstance(content, str)) or (thinking and isinstance(thinking, str)):
                out.append(self._line(content if isinstance(content, str) else "",
                                      thinking if isinstance(thinking, str) else None))
            deltas = delta.get("tool_calls")
            if deltas and isinstance(deltas, list):
                self._accumulate(deltas)
        reason = choice.get("finish_reason")
        if reason:
            self.finish = reason
            out.extend(self._flush_calls())

    def _accumulate(self, deltas: list) -> None:
        for position, d in enumerate(deltas):
            if not isinstance(d, dict):
                continue
            index = d.get("index", position)
            call = self.calls.get(index)
            if call is None:
                call = self.calls[index] = {"id": None, "name": "", "arguments": []}
            if d.get("id"):
                call["id"] = d["id"]  # once, or repeated in every fragment: never concatenated
            function = d.get("function")
            if isinstance(function, dict):
                name = function.get("name")
                if name and isinstance(name, str):
                    call["name"] = name
                arguments = function.get("arguments")
                if arguments is not None:
                    call["arguments"].append(arguments if isinstance(arguments, str)
                                             else jsonfmt.dumps(arguments))

    def _flush_calls(self) -> list[bytes]:
        if not self.calls:
            return []
        calls = []
        for index in sorted(self.calls):
            call = self.calls[index]
            text = "".join(call["arguments"])
            try:
                arguments = jsonfmt.loads(text) if text.strip() else {}
            except ValueError:
                arguments = text  # not JSON: hand it over as the model wrote it
            entry: dict[str, Any] = {"function": {"index": index, "name": call["name"],
                                                  "arguments": arguments}}
            if call["id"]:
                entry = {"id": call["id"], **entry}
            calls.append(entry)
        self.calls = {}
        return [self._line("", tool_calls=calls)]

    def _final(self) -> list[bytes]:
        out = self._flush_calls()
        self.done = True
        final: dict[str, Any] = {"model": self.model, "created_at": go_time()}
        if self.key == "message":
            final["message"] = {"role": "assistant", "content": ""}
        else:
            final["response"] = ""
        final["done"] = True
        final["done_reason"] = "length" if self.finish == "length" else "stop"
        usage = self.usage or {}
        for ours, theirs in (("prompt_eval_count", "prompt_tokens"),
                             ("eval_count", "completion_tokens")):
            value = usage.get(theirs)
            if isinstance(value, int) and value:
                final[ours] = value
        out.append(encode_line(final))
        return out

    def end(self) -> list[bytes]:
        """The body ended: the final line if the stream finished without [DONE], else raise."""
        if self.done or self.failed:
            return []
        if self.finish is not None:
            return self._final()
        raise OllamaBroken(f"{self.label} ended the stream without finishing it (no [DONE])")


def gather(lines: list[bytes], into: dict) -> None:
    """Fold Ollama lines into one non-streaming answer, as Ollama's stream:false builds it."""
    for line in lines:
        obj = jsonfmt.loads(line)
        if "error" in obj:
            raise OllamaError(obj["error"], status=502)
        key = "message" if "message" in obj else "response"
        if key == "message":
            message = obj["message"]
            into["content"] = into.get("content", "") + message.get("content", "")
            if message.get("thinking"):
                into["thinking"] = into.get("thinking", "") + message["thinking"]
            if message.get("tool_calls"):
                into.setdefault("tool_calls", []).extend(message["tool_calls"])
        else:
            into["content"] = into.get("content", "") + obj.get("response", "")
            if obj.get("thinking"):
                into["thinking"] = into.get("thinking", "") + obj["thinking"]
        if obj.get("done"):
            into["final"] = obj


def gathered_body(into: dict) -> bytes:
    final = dict(into["final"])
    if "message" in final:
        message = {"role": "assistant", "content": into.get("content", "")}
        if into.get("thinking"):
            message["thinking"] = into["thinking"]
        if into.get("tool_calls"):
            message["tool_calls"] = into["tool_calls"]
        final["message"] = message
    else:
        final["response"] = into.get("content", "")
        if into.get("thinking"):
            final["thinking"] = into["thinking"]
    return encode_line(final)


# -- the client ------------------------------------------------------------------------------

def parse_openai_url(url: str) -> tuple[str, str, str]:
    """`openai+http(s)://[:KEY@]host[:port]/v1` -> (base URL without the key, display, key)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.removeprefix("openai+")
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an openai+http(s) URL: {display_url(url)!r}")
    key = unquote(parts.password or parts.username or "") if "@" in parts.netloc else ""
    host = parts.netloc.rsplit("@", 1)[-1]
    base = urlunsplit((scheme, host, parts.path.rstrip("/"), "", ""))
    return base, "openai+" + base, key


def display_url(url: str) -> str:
    """*url* without any credentials, for logs, /readyz, /metrics and errors."""
    parts = urlsplit(url.strip())
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIClient(OllamaClient):
    """Talks to one OpenAI-compatible server; its calls speak Ollama to the handlers."""

    dialect = "openai"

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.base, self.name, key = parse_openai_url(url)
        self.label = f"upstream {self.name}"
        self.extra_headers = {"Authorization": f"Bearer {key}"} if key else {}
        super().__init__(url, **kwargs)

    def base_url(self, url: str) -> str:  # type: ignore[override]
        return self.base

    def post(self, path: str, body: bytes, on_lines: Optional[LinesCallback],
             parsed: Optional[dict] = None) -> "OpenAICall":
        if parsed is None:
            parsed = jsonfmt.loads(body)
        request = ollama_to_openai_request(path, parsed)
        return OpenAICall(self, "/chat/completions", jsonfmt.dumpb(request), on_lines,
                          model=str(parsed.get("model") or ""), generate=path == "/api/generate")

    async def models(self, timeout: float = 2.0) -> list[str]:
        call = OllamaCall(self, "/models", None, None, timeout=timeout)
        await call.finished()
        listing = jsonfmt.loads(bytes(call.body))
        names: list[str] = []
        for entry in listing.get("data") or []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                names.append(entry["id"])
                names.extend(a for a in entry.get("aliases") or [] if isinstance(a, str))
        return names

    async def version(self, timeout: float = 2.0) -> str:
        await self.models(timeout)
        return "openai"


class OpenAICall(OllamaCall):
    """One streamed /chat/completions request, delivered as Ollama lines."""

    def __init__(self, client: OpenAIClient, path: str, body: bytes,
                 on_lines: Optional[LinesCallback], *, model: str, generate: bool) -> None:
        self.translator = ChunkTranslator(model, generate, client.label)
        self._gathered: Optional[dict] = {} if on_lines is None else None
        self._raw_type = "application/json"
        super().__init__(client, path, body, on_lines)

    @property  # type: ignore[override]
    def content_type(self) -> str:
        if self.status == 200:
            return "application/x-ndjson" if self._gathered is None else "application/json"
        return self._raw_type

    @content_type.setter
    def content_type(self, value: str) -> None:
        self._raw_type = value

    def _on_chunk(self, chunk: bytes) -> Any:
        self._last_activity = time.monotonic()
        if self.status != 200:
            if len(self.body) < 64 * 1024:
                self.body += chunk
            return None
        try:
            lines = self.translator.feed(self._splitter.feed(chunk))
        except OllamaBroken as e:
            self.abort(e)
            return None
        if not lines:
            return None
        if self._gathered is not None:
            try:
                gather(lines, self._gathered)
            except OllamaError as e:
                self.abort(OllamaHTTPError(e.message, status=502))
            return None
        return self._deliver(lines)

    async def _at_end(self) -> None:
        lines = self.translator.feed(self._splitter.rest())
        lines += self.translator.end()  # raises when the stream was cut short
        if self._gathered is not None:
            gather(lines, self._gathered)
            if "final" not in self._gathered:
                raise OllamaBroken(f"{self.client.label} ended without an answer")
            self.body = bytearray(gathered_body(self._gathered))
        elif lines:
            await self.on_lines(lines)  # type: ignore[misc]


# -- Ollama lines -> OpenAI chunks (for /v1/chat/completions) -------------------------------

FINISH = {"stop": "stop", "length": "length"}


class OllamaToOpenAI:
    """Turns the Ollama lines of one reply into OpenAI `chat.completion.chunk` events."""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.first = True
        self.tool_calls = 0
        self._prefix = ('{"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
                        % (self.id, self.created, jsonfmt.dumps(model))).encode()

    def _event(self, choices: list, usage: Any = None, with_usage: bool = False) -> bytes:
        rest = {"choices": choices}
        if with_usage:
            rest["usage"] = usage
        return b"data: " + self._prefix + encode_line(rest)[1:] + b"\n\n"

    def _delta(self, delta: dict, finish: Optional[str] = None) -> bytes:
        if self.first:
            delta = {"role": "assistant", **delta}
            self.first = False
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish}],
                           None, self.include_usage)

    def events(self, lines: list[bytes]) -> bytes:
        out = []
        for line in lines:
            try:
                obj = jsonfmt.loads(line)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            message = obj.get("message")
            if not isinstance(message, dict):
                message = {"content": obj.get("response"), "thinking": obj.get("thinking"),
                           "tool_calls": obj.get("tool_calls")}
            delta: dict[str, Any] = {}
            content = message.get("content")
            if content and isinstance(content, str):
                delta["content"] = content
            thinking = message.get("thinking")
            if thinking and isinstance(thinking, str):
                delta["reasoning_content"] = thinking
            calls = message.get("tool_calls")
            if calls and isinstance(calls, list):
                delta["tool_calls"] = self._calls(calls)
            if delta:
                out.append(self._delta(delta))
            if obj.get("done") is True:
                out.append(self._finish(obj))
        return b"".join(out)

    def _calls(self, calls: list) -> list:
        out = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            arguments = function.get("arguments", {})
            out.append({"index": self.tool_calls, "id": call.get("id") or f"call_{uuid.uuid4().hex[:8]}",
                        "type": "function",
                        "function": {"name": function.get("name", ""),
                                     "arguments": arguments if isinstance(arguments, str)
                                     else jsonfmt.dumps(arguments)}})
            self.tool_calls += 1
        return out

    def finish_reason(self, done: dict) -> str:
        if self.tool_calls:
            return "tool_calls"
        return FINISH.get(done.get("done_reason") or "stop", "stop")

    def _finish(self, done: dict) -> bytes:
        out = self._delta({}, self.finish_reason(done))
        if self.include_usage:
            out += self._event([], usage_of(done), True)
        return out + b"data: [DONE]\n\n"


def usage_of(done: dict) -> dict:
    prompt = done.get("prompt_eval_count") if isinstance(done.get("prompt_eval_count"), int) else 0
    completion = done.get("eval_count") if isinstance(done.get("eval_count"), int) else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def error_object(message: str, status: int) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
            422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")
    code = "model_not_found" if status == 404 and "model" in message else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}

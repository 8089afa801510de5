"""The OpenAI dialect, upstream side: an Ollama request as an OpenAI one, and an OpenAI chat
stream (SSE) as Ollama NDJSON lines (see the package's docstring for the rules)."""

from __future__ import annotations

import time
from typing import Any, Optional

import jsonfmt
from upstreams.errors import UpstreamBroken, UpstreamError


# Ollama options with an OpenAI request field of their own.
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
                 "num_predict": "max_tokens", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p"}


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
            return jsonfmt.dumpb_line({"model": self.model, "created_at": go_time(), "message": message,
                                "done": False})
        line: dict[str, Any] = {"model": self.model, "created_at": go_time(), "response": content}
        if thinking:
            line["thinking"] = thinking
        if tool_calls:
            line["tool_calls"] = tool_calls
        line["done"] = False
        return jsonfmt.dumpb_line(line)

    def _error(self, message: Any) -> bytes:
        self.failed = True
        if isinstance(message, dict):
            message = message.get("message") or jsonfmt.dumps(message)
        return jsonfmt.dumpb_line({"error": f"{self.label}: {message or 'an error occurred during streaming'}"})

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
        out.append(jsonfmt.dumpb_line(final))
        return out

    def end(self) -> list[bytes]:
        """The body ended: the final line if the stream finished without [DONE], else raise."""
        if self.done or self.failed:
            return []
        if self.finish is not None:
            return self._final()
        raise UpstreamBroken(f"{self.label} ended the stream without finishing it (no [DONE])")


def gather(lines: list[bytes], into: dict) -> None:
    """Fold Ollama lines into one non-streaming answer, as Ollama's stream:false builds it."""
    for line in lines:
        obj = jsonfmt.loads(line)
        if "error" in obj:
            raise UpstreamError(obj["error"], status=502)
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
    return jsonfmt.dumpb_line(final)

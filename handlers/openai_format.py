"""The OpenAI dialect, client side (handlers/openai_api.py): Ollama lines as OpenAI
`chat.completion.chunk` events, usage and error objects."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

import jsonfmt

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
        return b"data: " + self._prefix + jsonfmt.dumpb_line(rest)[1:] + b"\n\n"

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
                delta["tool_calls"] = self.tool_call_objects(calls)
            if delta:
                out.append(self._delta(delta))
            if obj.get("done") is True:
                out.append(self._finish(obj))
        return b"".join(out)

    def tool_call_objects(self, calls: list) -> list:
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

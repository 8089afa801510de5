"""POST /v1/chat/completions and GET /v1/models: OpenAI's contract, for the OpenAI SDKs.

A request is translated into an Ollama /api/chat body and goes through exactly the same
turn machinery as /llmchat (handlers/chat.py: status grace, heartbeats, back-pressure,
client disconnects, failover); only the client-facing bytes differ, through chat.py's
`frame`/`frame_error`/`finish_once` hooks:

* streaming: `chat.completion.chunk` events, a finish chunk, the usage chunk (with
  `stream_options.include_usage`), `data: [DONE]`; an error after the stream started is a
  `data: {"error": {...}}` event;
* `"stream": false` (OpenAI's default): one `chat.completion` object;
* errors before the stream: a real HTTP status and `{"error": {message, type, param, code}}`.

Stateless by default.  With `X-Chatterd-AppID: <appID>` it is a turn of that appID's
conversation, exactly as on /llmchat: the client sends only its new messages.
"""

import time
from typing import Any, Optional

from handlers.base import BaseHandler
from handlers.validation import ClientError
from handlers.chat import LLMChatHandler
from handlers.turn_start import begin_turn
from handlers.llm_request import LLMRequest, parse_llm_request
from turns import Turn
import jsonfmt
from handlers.openai_format import OllamaToOpenAI, error_object, usage_of

APP_HEADER = "X-Chatterd-AppID"
STATELESS = "(stateless)"

# OpenAI request fields -> Ollama options.
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
           "max_tokens": "num_predict", "max_completion_tokens": "num_predict",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
           "top_k": "top_k", "min_p": "min_p"}


class StatelessTurn:
    """A turn of no conversation: the model sees the request's messages, nothing is stored."""

    id = 0
    window = None  # no conversation: nothing is left out
    replay = None

    def __init__(self, history: list[dict]) -> None:
        self.history = history
        self.ended = False

    async def delivered(self) -> None:
        pass

    async def end(self, status: str, reply: Any = None, error: Optional[str] = None) -> None:
        self.ended = True

    async def reject(self, reason: str) -> None:
        self.ended = True


def bad(message: str) -> ClientError:
    return ClientError(400, message)


def _text_and_images(content: Any, where: str) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts")
    texts, images = [], []
    for part in content:
        if not isinstance(part, dict):
            raise bad(f"{where}.content parts must be objects")
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
                images.append(url.split(";base64,", 1)[1])
            else:
                raise bad(f"{where}: only data: URLs are supported for images")
    return "".join(texts), images


def ollama_messages(messages: list) -> list[dict]:
    """OpenAI chat messages as Ollama's (tool-call arguments as objects, images as base64)."""
    out: list[dict] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for Ollama's tool_name
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object")
        role = m.get("role")
        if role == "developer":
            role = "system"
        text, images = _text_and_images(m.get("content"), where)
        message: dict[str, Any] = {"role": role, "content": text}
        if images:
            message["images"] = images
        if role == "assistant" and isinstance(m.get("tool_calls"), list):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise bad(f"{where}.tool_calls entries need a function")
                arguments = function.get("arguments") or "{}"
                if isinstance(arguments, str):
                    try:
                        arguments = jsonfmt.loads(arguments)
                    except ValueError:
                        raise bad(f"{where}.tool_calls arguments are not JSON") from None
                entry: dict[str, Any] = {"function": {"name": function.get("name", ""),
                                                      "arguments": arguments}}
                if call.get("id"):
                    entry = {"id": call["id"], **entry}
                    names[call["id"]] = function.get("name", "")
                calls.append(entry)
            message["tool_calls"] = calls
        if role == "tool":
            call_id = m.get("tool_call_id")
            if isinstance(call_id, str):
                message["tool_call_id"] = call_id
                if call_id in names:
                    message["tool_name"] = names[call_id]
        out.append(message)
    return out


def course_body(body: dict, app_id: Optional[str]) -> tuple[dict, bool]:
    """The /llmchat body for an OpenAI chat request, and whether usage was asked for."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("model is required and must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false")
    out: dict[str, Any] = {"appID": app_id if app_id is not None else STATELESS, "model": model,
                           "messages": ollama_messages(messages), "stream": bool(stream)}
    options = {theirs: body[ours] for ours, theirs in OPTIONS.items() if body.get(ours) is not None}
    if options:
        out["options"] = options
    if body.get("tools"):
        out["tools"] = body["tools"]
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            out["format"] = "json"
        elif fmt.get("type") == "json_schema":
            out["format"] = (fmt.get("json_schema") or {}).get("schema") or "json"
    stream_options = body.get("stream_options")
    usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    return out, usage


class ChatCompletionsHandler(LLMChatHandler):
    """/v1/chat/completions: an /llmchat turn (or a stateless one) in OpenAI's dialect."""

    translator: Optional[OllamaToOpenAI] = None
    sends_early = False  # its request depends on more than the history (see LLMChatHandler)

    def parse_request(self) -> LLMRequest:
        app_id = self.request.headers.get(APP_HEADER)
        self.stateful = app_id is not None
        body, include_usage = course_body(self.json_object(), app_id)
        request = parse_llm_request(body, max_messages=self.config.max_messages)
        self.translator = OllamaToOpenAI(request.model, include_usage)
        return request

    async def begin(self, request: LLMRequest) -> Turn:
        if self.stateful:
            return await begin_turn(self, request)
        self.app_id = None
        return StatelessTurn(request.messages)  # type: ignore[return-value]

    def frame(self, lines: list[bytes]) -> bytes:  # type: ignore[override]
        return self.translator.events(lines)  # type: ignore[union-attr]

    def frame_error(self, message: str) -> bytes:  # type: ignore[override]
        return b"data: " + jsonfmt.dumpb_line(error_object(message, 502)) + b"\n\n"

    async def finish_once(self, body: bytes) -> None:
        answer = jsonfmt.loads(body)
        message = answer.get("message") or {}
        translator = self.translator
        assert translator is not None
        out_message: dict[str, Any] = {"role": "assistant", "content": message.get("content", "")}
        if message.get("thinking"):
            out_message["reasoning_content"] = message["thinking"]
        if message.get("tool_calls"):
            out_message["tool_calls"] = translator.tool_call_objects(message["tool_calls"])
            out_message["content"] = out_message["content"] or None
        self.set_header("Content-Type", "application/json")
        await self._deliver_whole(jsonfmt.dumpb_line({
            "id": translator.id, "object": "chat.completion", "created": translator.created,
            "model": translator.model,
            "choices": [{"index": 0, "message": out_message,
                         "finish_reason": translator.finish_reason(answer)}],
            "usage": usage_of(answer)}))

    def error_body(self, status_code: int, message: str) -> bytes:  # type: ignore[override]
        if status_code == 422:  # OpenAI says 400 for every invalid request
            status_code = 400
            self.set_status(400)
        return jsonfmt.dumpb_line(error_object(message, status_code))


class ModelsHandler(BaseHandler):
    """GET /v1/models: every model some upstream lists (listed again if stale)."""

    async def get(self) -> None:
        router = self.upstreams
        oldest = min((m.listed_at or 0.0) for m in router.members)
        if time.monotonic() - oldest > router.refresh_every or not oldest:
            await router.refresh()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": f"upstream {m.index}"}
                for name, m in router.models()]
        self.send_json({"object": "list", "data": data})


__all__ = ["ChatCompletionsHandler", "ModelsHandler", "StatelessTurn"]

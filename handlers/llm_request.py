"""Validation of the course's LLM request body {appID, model, messages, stream, ...}.

Every rejection says which field is wrong, so a client developer can fix it.  The
whole body is checked (check_json) before any field is looked at, so nothing we store
or send upstream can hold a value PostgreSQL or Ollama would choke on.
"""

from dataclasses import dataclass
from typing import Any

import jsonfmt
from handlers.base import ClientError, check_json, valid_text

ROLES = ("system", "user", "assistant", "tool")
MAX_APPID = 155
MAX_MODEL = 200
DEFAULT_MAX_MESSAGES = 1000  # the max-messages setting's default
# Our own fields; everything else a client sends (options, format, keep_alive,
# think, tools, ...) is Ollama's and goes upstream untouched.
OWN_FIELDS = ("appID", "model", "messages", "stream")


@dataclass
class LLMRequest:
    app_id: str
    model: str
    messages: list[dict]
    stream: bool
    passthrough: dict[str, Any]

    def upstream_body(self, history: list[dict]) -> bytes:
        """The /api/chat body: the client's Ollama fields with our history and no appID."""
        body = dict(self.passthrough)
        body.update(model=self.model, messages=history, stream=self.stream)
        return jsonfmt.dumpb(body)


def invalid(message: str) -> ClientError:
    return ClientError(422, message)


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise invalid(f"{where} must be an object with role and content")
    if "role" not in m:
        raise invalid(f"{where}.role is missing")
    if not isinstance(m["role"], str):
        raise invalid(f"{where}.role must be a string, one of {', '.join(ROLES)}")
    role = m["role"].lower()
    if role not in ROLES:
        shown = jsonfmt.dumps(m["role"][:40])  # echo a short prefix, not a megabyte
        raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, not {shown}")
    if "content" not in m:
        raise invalid(f"{where}.content is missing")
    valid_text(m["content"], f"{where}.content")
    return {**m, "role": role}


def parse_llm_request(body: dict, *, allow_empty_messages: bool = False,
                      default_stream: bool = True,
                      max_messages: int = DEFAULT_MAX_MESSAGES) -> LLMRequest:
    """Validate an llmchat/llmprep body; raise ClientError(422) naming the bad field."""
    check_json(body)
    if "appID" not in body or body["appID"] is None:
        raise invalid("appID is required")
    app_id = valid_text(body["appID"], "appID")
    if not app_id:
        raise invalid("appID must not be empty")
    if len(app_id) > MAX_APPID:
        raise invalid(f"appID is longer than {MAX_APPID} characters")
    model = _model(body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages must be a list")
    if not messages and not allow_empty_messages:
        raise invalid("messages must not be empty")
    if len(messages) > max_messages:
        raise invalid(f"messages holds {len(messages)} entries; the limit is {max_messages}")
    checked = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    stream = body.get("stream")
    if stream is None:
        stream = default_stream
    elif not isinstance(stream, bool):
        raise invalid("stream must be true or false")
    passthrough = {k: v for k, v in body.items() if k not in OWN_FIELDS}
    return LLMRequest(app_id, model, checked, stream, passthrough)


def _model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip():
        raise invalid("model is required and must be a non-empty string")
    if len(model) > MAX_MODEL:
        raise invalid(f"model is longer than {MAX_MODEL} characters")
    return model  # check_json has already refused NUL and lone surrogates

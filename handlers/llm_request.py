"""Validation of the course's LLM request body {appID, model, messages, stream, ...}.

Every rejection says which field is wrong, so a client developer can fix it.  The
whole body is checked (check_json) before any field is looked at, so nothing we store
or send upstream can hold a value PostgreSQL or Ollama would choke on.
"""

from dataclasses import dataclass
from typing import Any, Optional

import jsonfmt
from handlers.validation import ClientError, check_json, valid_text

ROLES = ("system", "user", "assistant", "tool")
MAX_APPID = 155
MAX_MODEL = 200
# Our own fields; everything else a client sends (options, format, keep_alive,
# think, tools, ...) is Ollama's and goes upstream untouched.
OWN_FIELDS = ("appID", "model", "messages", "stream")
# Room kept for the reply when the request does not set options.num_predict: a quarter
# of the context (which also absorbs the error of estimated token counts).
REPLY_SHARE = 4


def _count(value: Any) -> Optional[int]:
    """An integer option as Ollama reads one (a JSON number with no fraction), else None."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**31:
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class LLMRequest:
    app_id: str
    model: str
    messages: list[dict]
    stream: bool
    passthrough: dict[str, Any]

    def context_budget(self, default_context: int) -> tuple[Optional[int], Optional[int]]:
        """(the context the turn is budgeted for, the tokens its history may take).

        The context is options.num_ctx when the client gave one, else *default_context*
        (--context-tokens), which is then sent to Ollama as num_ctx so that Ollama's
        window is the one we budget for (Ollama's own default depends on its version and
        VRAM).  The history gets the context minus room for the reply: options.num_predict
        when positive, else a quarter.  (None, None) when *default_context* is 0 and the
        client set no num_ctx: the whole conversation is sent, as before.
        """
        options = self.passthrough.get("options")
        options = options if isinstance(options, dict) else None
        context = _count(options.get("num_ctx")) if options is not None else None
        if context is None:
            if default_context <= 0:
                return None, None
            context = default_context
            if options is None and "options" not in self.passthrough:
                self.passthrough["options"] = options = {}
            if options is not None:
                self.passthrough["options"] = {**options, "num_ctx": context}
        predict = _count(options.get("num_predict")) if options is not None else None
        reserve = predict if predict is not None and predict > 0 else context // REPLY_SHARE
        return context, max(context - reserve, 0)

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


def valid_app_id(value: Any) -> str:
    """*value* if it is an appID chatterd keeps (a non-empty storable string of at most
    MAX_APPID characters), else ClientError(422) saying why."""
    if value is None:
        raise invalid("appID is required")
    app_id = valid_text(value, "appID")
    if not app_id:
        raise invalid("appID must not be empty")
    if len(app_id) > MAX_APPID:
        raise invalid(f"appID is longer than {MAX_APPID} characters")
    return app_id


def parse_llm_request(body: dict, *, max_messages: int, allow_empty_messages: bool = False,
                      default_stream: bool = True) -> LLMRequest:
    """Validate an llmchat/llmprep body of at most *max_messages* (--max-messages) messages;
    raise ClientError(422) naming the bad field."""
    check_json(body)
    app_id = valid_app_id(body.get("appID"))
    model = _model(body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages must be a list")
    if not messages and not allow_empty_messages:
        raise invalid("messages must not be empty")
    if len(messages) > max_messages:
        raise invalid(f"messages holds {len(messages)} entries; the limit is {max_messages}")
    checked = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    options = body.get("options")
    if isinstance(options, dict):
        for name in ("num_ctx", "num_predict"):
            if name in options and _count(options[name]) is None:
                raise invalid(f"options.{name} must be an integer")
        if "num_ctx" in options and _count(options["num_ctx"]) <= 0:
            raise invalid("options.num_ctx must be a positive integer")
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

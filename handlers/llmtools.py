"""POST /llmtools: a /llmchat turn with tool calling (the course's llmTools, done right).

The body is /llmchat's plus `tools`, the client's Ollama tool schemas.  They are kept with
the conversation (`tool_schemas`): a client that sends them replaces the kept ones, a
later turn without them is offered the kept ones again.  chatterd offers the model the
client's tools and its own **resident** tools (tools/registry.py; a client tool with a
resident tool's name is not offered: the resident one is) and streams the reply exactly
as /llmchat does (handlers/chat.py).  When an upstream round ends with tool calls:

* only resident tools called: the call line has been relayed to the client as a `data:`
  event (the client sees the whole exchange); chatterd runs each tool (bad arguments, an
  exception, a timeout: the result is an "error: ..." text), and asks the model again with
  the call and its results, in the same turn, until the model answers in text.  At most
  --tool-rounds rounds: a model that calls again after them ends the turn failed with an
  error event, those calls not run;
* a client's tool called: its line goes to the client as `event: tool_calls` (a line with
  resident and client calls is split in two), resident calls of it are run, and the turn
  ends complete with the assistant's `tool_calls` stored.  The client runs its tool and
  POSTs /llmtools with `{"role": "tool", "content": ..., "tool_name": ...}`: a turn that
  starts with a tool result, which the context budget only ever sends together with the
  turn that called it (`turns.continues`, db/functions/begin_turn.sql).

The turn contract holds: the rounds' calls and results are pending until the turn ends
and enter the conversation with it in one transaction (db/functions/end_turn.sql),
always as whole rounds, a call followed by its results and the model's answer to them (so
the conversation never goes on from a tool result): a turn cut short (the client leaves,
the upstream fails, a shutdown, the round limit) keeps the rounds that finished and drops
the calls of the round that did not; one left with no answer text at all ended before any
answer text, and is a record outside the conversation, its rounds with it.
"""

from typing import Any, Optional

import jsonfmt
import sse
from db import conversations
from db.conversations import Reply, round_message
from handlers.chat import LLMChatHandler
from handlers.turn_start import begin_turn
from handlers.reply_text import ReplyText
from handlers.llm_request import LLMRequest, invalid, parse_llm_request
from tools.registry import call_name
from turns import Turn

MAX_TOOLS = 128
MAX_TOOL_NAME = 64
TOOL_CALLS = b'"tool_calls"'


def parse_tools(value: Any) -> list[dict]:
    """The client's `tools`: a list of Ollama tool schemas; 422 naming the bad field."""
    if not isinstance(value, list):
        raise invalid("tools must be a list of tool schemas "
                      '({"type": "function", "function": {"name", "description", "parameters"}})')
    if len(value) > MAX_TOOLS:
        raise invalid(f"tools holds {len(value)} schemas; the limit is {MAX_TOOLS}")
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"{where} must be an object with type and function")
        if tool.get("type") != "function":
            raise invalid(f'{where}.type must be "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function must be an object with name, description and parameters")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise invalid(f"{where}.function.name must be a non-empty string")
        if len(name) > MAX_TOOL_NAME:
            raise invalid(f"{where}.function.name is longer than {MAX_TOOL_NAME} characters")
        if name in names:
            raise invalid(f"{where}.function.name {jsonfmt.dumps(name)} is given twice")
        names.add(name)
        if not isinstance(function.get("description"), str):
            raise invalid(f"{where}.function.description must be a string")
        params = function.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict):
            raise invalid(f"{where}.function.parameters must be an object (a JSON schema)")
        if params.get("type", "object") != "object":
            raise invalid(f'{where}.function.parameters.type must be "object"')
        if not isinstance(params.get("properties", {}), dict):
            raise invalid(f"{where}.function.parameters.properties must be an object")
        required = params.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise invalid(f"{where}.function.parameters.required must be a list of names")
    return value


def tool_result(call: dict, text: str) -> dict:
    """The `tool` message answering *call* (Ollama's tool_name; its id when it had one)."""
    message = {"role": "tool", "content": text, "tool_name": call_name(call) or ""}
    if isinstance(call.get("id"), str):
        message["tool_call_id"] = call["id"]
    return message


class LLMToolsHandler(LLMChatHandler):
    client_tools: Optional[list] = None
    sends_early = False  # its request depends on more than the history (see LLMChatHandler)
    rounds = 0  # resident tool rounds run in this turn
    shutting_down = False

    def parse_request(self) -> LLMRequest:
        request = parse_llm_request(self.json_object(), max_messages=self.config.max_messages)
        tools = request.passthrough.pop("tools", None)
        self.client_tools = None if tools is None else parse_tools(tools)
        if not request.stream:
            raise invalid("stream must be true: /llmtools answers with an SSE stream")
        for i, m in enumerate(request.messages):
            if "tool_name" in m and not isinstance(m["tool_name"], str):
                raise invalid(f"messages[{i}].tool_name must be a string")
        return request

    async def begin(self, request: LLMRequest) -> Turn:
        turn = await begin_turn(self, request)
        if turn.replay is not None:
            return turn
        try:  # the turn holds the appID's lease: no other turn changes the schemas meanwhile
            self.client_tools = await conversations.tool_schemas(
                self.pool, self.owner_id, request.app_id, self.client_tools)
        except BaseException:
            await turn.reject("its tool schemas could not be read or stored")
            raise
        resident = self.application.tools
        offered = [t for t in self.client_tools  # (kept ones may come from the course import)
                   if isinstance(t, dict) and not resident.has(call_name(t))] + resident.schemas()
        if offered:
            request.passthrough["tools"] = offered
        self.before: list[dict] = []  # the finished rounds' calls and results, as stored
        return turn

    async def next_round(self, request: LLMRequest) -> bool:
        reply = self.reply
        calls = reply.extra.get("tool_calls") or []
        registry = self.application.tools
        ours = [c for c in calls if registry.is_resident(c)]
        if not ours:
            return False  # text, or only the client's tools: the turn ends here
        limit = self.config.tool_rounds
        if self.rounds >= limit:
            # These calls are not run, and the turn ends without an answer to them: like a
            # round cut short, they are not stored (_finish_turn).
            self._end("failed", f"the model called tools in {limit + 1} rounds in a row; "
                                f"the limit is {limit} (--tool-rounds)")
            return False
        self.rounds += 1
        results = [tool_result(c, await registry.call(c)) for c in ours]
        # A client that left a turn kept generating (handlers/resumable.py) is not gone.
        gone = self.client_gone and not (self.record is not None and self.record.detached)
        if gone or self.stopped or self.shutting_down:
            # No round follows, so the model never answers these results: the calls are not
            # stored either (a stored call is followed by its results and the model's answer
            # to them, so the conversation never goes on from a tool result).
            if gone or self.stopped:
                self._end("interrupted", "the client left while tools ran" if gone else
                          "the turn was stopped while tools ran")
            else:
                self._end("failed", "chatterd is shutting down; the reply was cut short")
            return False
        if len(ours) < len(calls):
            # The client's tools were called too: the turn ends here, complete, with the
            # results of ours stored after the reply; the client's come with its next turn.
            reply.after = [round_message(m) for m in results]
            return False
        assistant = {"role": "assistant", "content": str(self.text), "tool_calls": calls}
        self.before.append(round_message(assistant, model=reply.model, tokens=reply.tokens))
        self.before.extend(round_message(m) for m in results)
        self.turn.history.extend([assistant, *results])
        self.reply = Reply(model=request.model, before=self.before)
        self.text = ReplyText()
        self.done_line = None
        self.failure = None
        self.start_call("/api/chat", request.upstream_body(self.turn.history), self._on_lines)
        return True

    async def _finish_turn(self) -> None:
        reply = self.reply
        if reply.status != "complete":
            # The calls of a round cut short were never answered (nor always run): a call is
            # stored only with its results and the answer to them.  A reply left with no
            # text either makes the turn one that ended before any answer text: a record
            # outside the conversation, its finished rounds with it.
            reply.extra.pop("tool_calls", None)
        await super()._finish_turn()

    def end_for_shutdown(self) -> None:
        self.shutting_down = True  # no further round starts
        super().end_for_shutdown()

    # -- what the client sees ---------------------------------------------------------

    def frame(self, lines: list[bytes]) -> bytes:  # type: ignore[override]
        """Ollama lines -> events; a line calling the client's tools is `event: tool_calls`."""
        if not any(TOOL_CALLS in line for line in lines):
            return sse.data_events(lines)
        return b"".join(self._frame_line(line) for line in lines)

    def _frame_line(self, line: bytes) -> bytes:
        if TOOL_CALLS not in line:
            return sse.data_events([line])
        try:
            chunk = jsonfmt.loads(line)
            calls = chunk["message"]["tool_calls"]
            if not isinstance(calls, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return sse.data_events([line])
        registry = self.application.tools
        theirs = [c for c in calls if not registry.is_resident(c)]
        if not theirs:
            return sse.data_events([line])
        if len(theirs) == len(calls):
            return b"event: tool_calls\n" + sse.data_events([line])
        ours = [c for c in calls if registry.is_resident(c)]
        message = chunk["message"]
        resident_line = {**chunk, "message": {**message, "tool_calls": ours}}
        client_line = {**chunk, "message": {**message, "content": "", "tool_calls": theirs}}
        return sse.data_events([jsonfmt.dumpb(resident_line)]) + \
            b"event: tool_calls\n" + sse.data_events([jsonfmt.dumpb(client_line)])

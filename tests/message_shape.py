"""The shape every message list chatterd sends a model must have (docs: the turn contract).

Many chat templates refuse anything else (Mistral on vLLM: "conversation roles must
alternate user/assistant/user/assistant/..."; Gemma 3 on llama.cpp likewise):

* system messages, if any, first;
* then user and assistant strictly alternating, starting with a user message, except that
  an assistant message with tool calls is followed by its tool results (one or more `tool`
  messages) and then the next assistant message;
* ending with the turn's own new message (a user message, or a tool result: a client's
  result for its tool, or the results of a resident tool round).

Only a client can break the alternation: by sending several messages in one request, or
through /llmprep's messages.  The caller says which adjacent pairs a client made
(`client_pair`); every other break is chatterd's.

    problems = shape_problems(messages, client_pair=lambda a, b: ...)   # [] when well formed
"""

from typing import Callable, Optional

ClientPair = Callable[[Optional[dict], dict], bool]


def _never(a: Optional[dict], b: dict) -> bool:
    return False


def shape_problems(messages: list, client_pair: Optional[ClientPair] = None) -> list[str]:
    """What is wrong with the shape of *messages*, one line per problem ([] if nothing).

    *client_pair(a, b)* is True when the adjacent messages a, b were sent together by one
    client request (or by /llmprep), which may break the alternation; a is None for the
    first message after the system messages."""
    client_pair = client_pair or _never
    problems: list[str] = []
    if not messages:
        return ["the list is empty"]
    i = 0
    while i < len(messages) and _role(messages[i]) == "system":
        i += 1
    rest = messages[i:]
    if not rest:
        return ["the list holds only system messages"]
    flow = []  # (index, message) of the non-system messages
    for k, m in enumerate(rest):
        if _role(m) == "system":
            problems.append(f"a system message at {i + k}, after the first non-system message")
        else:
            flow.append((i + k, m))
    if _role(rest[0]) != "user" and not client_pair(None, rest[0]):
        problems.append(f"the first message after the system messages is {_role(rest[0])!r}, "
                        "not 'user'")
    for (ka, a), (kb, b) in zip(flow, flow[1:]):
        ra, rb = _role(a), _role(b)
        if ra == "assistant" and a.get("tool_calls"):
            allowed = ("tool",)  # the call's results come next
        elif ra == "assistant":
            allowed = ("user",)
        elif ra == "tool":
            allowed = ("tool", "assistant")  # more results, or the answer to them
        else:  # user (or a role no template knows, which then breaks it anyway)
            allowed = ("assistant",)
        if rb not in allowed and not client_pair(a, b):
            problems.append(f"{ra!r} followed by {rb!r} at {ka}-{kb}: "
                            f"{_short(a)} then {_short(b)}")
    if _role(rest[-1]) not in ("user", "tool"):
        problems.append(f"the list ends with a {_role(rest[-1])!r} message, not the turn's own "
                        "new message")
    return problems


def _role(m: object) -> str:
    return m.get("role") if isinstance(m, dict) and isinstance(m.get("role"), str) else "?"


def _short(m: dict) -> str:
    content = m.get("content")
    return repr(content[:40]) if isinstance(content, str) else repr(content)

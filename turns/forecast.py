"""What the next turn of a conversation will be sent, told before begin_turn answers
(--early-upstream, handlers/early_call.py): the conversation as this process last saw it
end, plus the turn's own messages.  begin_turn still decides; a forecast it does not confirm
costs an upstream request that is aborted, never a wrong answer (turns/__init__.py, begin).

    forecasts = Forecasts(size)
    history = forecasts.forecast(owner_id, app_id, messages, budget)   # or None
    forecasts.remember(turn, after_turn(turn, status, reply, outcome))  # when a turn ends
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import jsonfmt
from db import conversations
from db.conversations import Reply


class Speculation(Protocol):
    """An upstream request sent with `history` before its turn began (handlers/early_call.py).
    `begin` calls settle() once, as soon as begin_turn's first answer is in: True when the
    turn has begun and the history it means is exactly `history`, else False (the appID
    was busy, a resend, another history, an error), and then nothing of the request may
    reach the client or the conversation."""

    history: list[dict]

    def settle(self, confirmed: bool) -> None: ...


@dataclass
class Known:
    """A conversation as this process last saw it end: what its next turn is sent before
    its own messages (when nothing else happened meanwhile), and about how many tokens
    that is (as counted when it was sent, plus estimates)."""

    history: list[dict]
    tokens: int
    incoming: list[dict]  # the messages of its last turn, as the client sent them


class Forecasts:
    """The conversations whose last turn ended in this process, whole in their context: as
    many as *size* (least recently used out first; 0: none, nothing is forecast)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.known: "OrderedDict[tuple[int, str], Known]" = OrderedDict()

    def forecast(self, owner_id: int, app_id: str, messages: list[dict],
                 budget: Optional[int]) -> Optional[list[dict]]:
        """What a turn of *messages* would be sent (as `Turn.history`), if this process can
        tell: the conversation's last turn ended here (or a turn after it was rejected here),
        nothing of it was left out, and it still fits *budget* with *messages*, with room
        to spare for counts learned since.  None: ask begin_turn first; so too for the last
        turn's messages again, likely a resend (answered from storage, not by the model).
        """
        known = self.known.get((owner_id, app_id))
        if known is None or messages == known.incoming:
            return None
        if budget is not None and known.tokens + rough_tokens(messages) > budget - budget // 8:
            return None
        return with_new_messages(known.history, messages)

    def remember(self, turn: Any, known: Optional[Known]) -> None:
        """*turn* ended and its conversation is now *known* (None: not plain enough)."""
        key = (turn.owner_id, turn.app_id)
        self.known.pop(key, None)
        if known is None or self.size <= 0 or turn.window.omitted_messages:
            return
        self.known[key] = known
        while len(self.known) > self.size:
            self.known.popitem(last=False)

    def forget(self, owner_id: int, app_id: str) -> Optional[Known]:
        """Stop forecasting the conversation (a turn of it runs, it was replaced or deleted);
        what was known of it."""
        return self.known.pop((owner_id, app_id), None)


def after_turn(turn: Any, status: str, reply: Optional[Reply], outcome: str) -> Optional[Known]:
    """The conversation once *turn* has ended as *status* (stored: *outcome*), for the next
    turn's forecast, when that is plain: unchanged by a rejected turn, or grown by this
    turn's messages and a text reply (nothing else is forecast)."""
    if turn.replay is not None or not turn.history:
        return None
    if status == "rejected":
        return Known(turn.before, turn.window.sent_tokens, turn.resend_of)
    if status != "complete" or outcome not in ("stored", "stored-suspect", "already") \
            or reply is None or not reply.content or reply.extra or reply.before or reply.after:
        return None
    answer = {"role": "assistant", "content": reply.content}
    sent = max(turn.window.sent_tokens, reply.prompt_tokens or 0)
    tokens = reply.tokens if reply.tokens is not None else rough_tokens([answer])
    return Known(turn.history + [answer], sent + tokens, turn.incoming)


def same_messages(a: list[dict], b: list[dict]) -> bool:
    """Are *a* and *b* the same messages, as JSON values (the key order aside)?"""
    return a is b or (len(a) == len(b) and jsonfmt.canonical(a) == jsonfmt.canonical(b))


def rough_tokens(messages: list[dict]) -> int:
    """About what estimate_tokens (db/functions/estimate_tokens.sql) counts for *messages*
    (characters for bytes): enough to tell whether a forecast history still fits."""
    total = 0
    for m in messages:
        content = m.get("content")
        total += 4 + (len(content) + 3) // 4 if isinstance(content, str) else 4
        if m.get("tool_calls"):
            total += len(jsonfmt.dumps(m["tool_calls"])) // 4 + 1
        images = m.get("images")
        if isinstance(images, list):
            total += 768 * len(images)
    return total


def with_new_messages(history: list[dict], messages: list[dict]) -> list[dict]:
    """What the model is sent: the conversation so far, then the turn's own messages, as
    they are stored (so later turns send exactly the same), system prompts first."""
    new = [conversations.as_stored(m) for m in messages]
    if not any(m["role"] == "system" for m in new):
        return history + new
    ordered = [m for m in history if m["role"] == "system"] + [m for m in new if m["role"] == "system"]
    return ordered + [m for m in history if m["role"] != "system"] + \
        [m for m in new if m["role"] != "system"]

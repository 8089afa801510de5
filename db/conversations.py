"""SQL for LLM conversations: turns, their messages, and the per-appID lease.

A turn's incoming messages are stored when it begins, as pending; the turn enters the
conversation when it ends, with its reply, in one transaction (the SQL functions that do
it: db/functions/begin_turn.sql and end_turn.sql).  Every function here takes
the pool and holds a connection only for its own statement: never across an LLM stream.
Call as `await begin_turn(pool, ...)`.
"""

import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import asyncpg

from db.history_cache import HistoryCache
from db.pool import connection

# Ollama message fields stored verbatim in `extra` and sent back upstream.
EXTRA_FIELDS = ("images", "tool_calls", "tool_name", "tool_call_id", "thinking")


@dataclass
class Reply:
    """An assistant reply as it ends: complete, interrupted (client left) or failed."""

    content: str = ""
    status: str = "complete"
    error: Optional[str] = None
    model: Optional[str] = None
    tokens: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: Optional[int] = None  # Ollama's prompt_eval_count for the prompt sent
    # Tool rounds (/llmtools), as stored messages {role, content, extra, model, tokens}:
    # the earlier rounds' calls and results, stored before the reply, and the results of
    # tools the reply itself called, stored after it (db/functions/end_turn.sql).
    before: list[dict] = field(default_factory=list)
    after: list[dict] = field(default_factory=list)


@dataclass
class Window:
    """What a turn sends the model out of its conversation, and what it leaves out.

    Messages and tokens (as counted: learned from Ollama, else estimated); sent_* include
    the system prompts and the turn's own messages.  context is the context (num_ctx) the
    turn was budgeted for, None when unbounded.
    """

    sent_messages: int = 0
    sent_tokens: int = 0
    omitted_messages: int = 0
    omitted_tokens: int = 0
    context: Optional[int] = None

    def describe(self) -> str:
        """`sent=12 messages/3400 tokens; omitted=40 messages/9100 tokens; context=8192 tokens`"""
        text = (f"sent={self.sent_messages} messages/{self.sent_tokens} tokens; "
                f"omitted={self.omitted_messages} messages/{self.omitted_tokens} tokens")
        if self.context is not None:
            text += f"; context={self.context} tokens"
        return text


def as_stored(message: dict) -> dict:
    """The message as the conversation keeps it: role, content and the Ollama extras."""
    stored = {"role": message["role"], "content": message["content"]}
    for k in EXTRA_FIELDS:
        if k in message:
            stored[k] = message[k]
    return stored


def round_message(message: dict, model: Optional[str] = None,
                  tokens: Optional[int] = None) -> dict:
    """A message of a tool round as end_turn stores it (see Reply.before/after)."""
    return {"role": message["role"], "content": message["content"],
            "extra": {k: message[k] for k in EXTRA_FIELDS if k in message} or None,
            "model": model, "tokens": tokens}


def _pending(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"],
             "extra": {k: m[k] for k in EXTRA_FIELDS if k in m} or None} for m in messages]


# The statements a turn runs, as begin_turn and end_turn send them (ready_connection runs
# the very same text, so asyncpg's per-connection statement cache holds them too).
BEGIN_TURN = ("SELECT turn_id, history, sent_messages, sent_tokens, omitted_messages,"
              " omitted_tokens, replay, window_turns, history_turns"
              " FROM begin_turn($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
END_TURN = "SELECT end_turn($1, $2, $3, $4, $5, $6, $7, true, $8)"


async def begin_turn(pool: asyncpg.Pool, app_id: str, owner: str, lease_seconds: float,
                     messages: list[dict], *, replace: bool = False,
                     resend_seconds: float = 0.0, budget: Optional[int] = None,
                     context: Optional[int] = None, delivered: Optional[list[int]] = None,
                     waited_for: Optional[int] = None, cache: Optional[HistoryCache] = None
                     ) -> tuple[Optional[int], Optional[list[dict]], Window, Optional[dict]]:
    """Take the appID's lease and store *messages* as a pending turn, in one round trip.

    Returns (turn id, the conversation before this turn that fits *budget* tokens with
    the new messages: system prompts and the newest whole turns, what was sent and left
    out, None).  *budget* None: the
    whole conversation.  With *replace*, the appID's earlier turns are deleted.
    When *messages* resend the appID's last turn, which ended (complete or failed) less
    than *resend_seconds* ago but was never delivered, nothing is stored and the result
    is (that turn's id, None, an empty Window, its stored reply as {content, extra,
    model, tokens, status, error}).  *delivered*: turns whose end reached their client
    since the last call (see mark_delivered), recorded first.  When the appID is busy the
    turn id is None and the last item is {"waiting_for": the running turn's id}; pass that
    id back as *waited_for* on the next try, so that a double send of the same messages
    is answered from that turn's storage instead of being asked and stored twice.  With
    *cache* (db/history_cache.py), turns it holds are not read again.
    """
    if cache is not None and replace:
        cache.forget(app_id)
    known = cache.snapshot(app_id) if cache is not None else {}
    async with connection(pool, "begin_turn") as con:
        row = await con.fetchrow(
            BEGIN_TURN, app_id, owner, lease_seconds, _pending(messages), replace, resend_seconds,
            budget, context, delivered or None, waited_for, list(known) or None)
    history = row["history"]
    if history is not None and cache is not None:  # (without one, all was fetched, in order)
        history = cache.assemble(app_id, known, history, row["history_turns"],
                                 row["window_turns"])
    return row["turn_id"], history, Window(
        row["sent_messages"], row["sent_tokens"], row["omitted_messages"],
        row["omitted_tokens"], context), row["replay"]


async def ready_connection(con: asyncpg.Connection) -> None:
    """Run two turns of one new conversation on *con*, then roll them back: nothing is
    stored (only the turn id sequence moves on, by two), but this connection's PostgreSQL
    backend has compiled begin_turn and end_turn, loaded the catalog entries their
    statements use and run each statement of a usual first and later turn once (about
    15 ms of its CPU, which a cold connection's first turn would otherwise pay while a
    client waits; PL/pgSQL still plans a statement anew for its first five runs).
    Call as `await ready_connection(con)` on a connection outside a transaction."""
    app_id = f"chatterd-ready-{uuid.uuid4().hex}"  # never seen again: rolled back
    transaction = con.transaction()
    await transaction.start()
    try:
        delivered = None
        for n in (1, 2):  # different words, so the second is not taken for a resend
            row = await con.fetchrow(BEGIN_TURN, app_id, "chatterd-ready", 1.0,
                                     _pending([{"role": "user", "content": f"ready {n}"}]),
                                     False, 120.0, 8192, 8192, delivered, None, None)
            await con.fetchval(END_TURN, row["turn_id"], "complete", None, "ready", None,
                               "ready", 1, row["sent_tokens"] + 1)
            delivered = [row["turn_id"]]
    finally:
        await transaction.rollback()


async def mark_delivered(pool: asyncpg.Pool, turn_ids: list[int]) -> None:
    """Record that these turns' ends reached their clients (so a resend is a new turn).
    begin_turn takes the same list, so this runs only when no turn begins for a while."""
    async with connection(pool, "mark_delivered") as con:
        await con.execute("UPDATE turns SET delivered = true WHERE id IN (SELECT id FROM turns"
                          " WHERE id = ANY($1::bigint[]) AND NOT delivered"
                          " FOR UPDATE SKIP LOCKED)", turn_ids)


async def end_turn(pool: asyncpg.Pool, turn_id: int, status: str, error: Optional[str],
                   reply: Optional[Reply]) -> str:
    """End the turn (with its reply, if any) and release the lease, in one transaction.

    Idempotent.  Returns 'stored', 'stored-suspect' (stored, but Ollama counted fewer
    prompt tokens than are known to have been sent: it must have cut the prompt),
    'already' (an earlier call did it) or 'lost' (the turn was abandoned because its
    lease was taken over).  The reply's prompt_tokens teaches the token counts of what
    the turn sent (db/functions/learn_tokens.sql).
    """
    async with connection(pool, "end_turn") as con:
        if reply is None:
            return await con.fetchval(
                "SELECT end_turn($1, $2, $3, NULL, NULL, NULL, NULL, false, NULL::integer)",
                turn_id, status, error)
        if reply.before or reply.after:
            return await con.fetchval(
                "SELECT end_turn($1, $2, $3, $4, $5, $6, $7, true, $8, $9, $10)",
                turn_id, status, error, reply.content, reply.extra or None, reply.model,
                reply.tokens, reply.prompt_tokens, reply.before, reply.after)
        return await con.fetchval(END_TURN, turn_id, status, error, reply.content, reply.extra or None,
                                  reply.model, reply.tokens, reply.prompt_tokens)


async def tool_schemas(pool: asyncpg.Pool, app_id: str, replace: Optional[list] = None) -> list:
    """The appID's client tool schemas (Ollama `tools`), kept with its conversation.

    With *replace* (the client sent its tools), they become the appID's and are returned;
    otherwise the ones kept (none: []).  One statement.
    """
    async with connection(pool, "tool_schemas") as con:
        if replace is not None:
            await con.execute(
                "INSERT INTO tool_schemas AS s (appid, schemas) VALUES ($1, $2)"
                " ON CONFLICT (appid) DO UPDATE SET schemas = EXCLUDED.schemas, updated_at = now()",
                app_id, replace)
            return replace
        kept = await con.fetchval("SELECT schemas FROM tool_schemas WHERE appid = $1", app_id)
    return kept if isinstance(kept, list) else []


async def renew_leases(pool: asyncpg.Pool, owner: str, lease_seconds: float,
                       turn_ids: list[int]) -> int:
    """Extend the leases *owner* holds for its running turns *turn_ids*; return how many.
    (A turn whose end could not be stored is not running: its lease is left to expire.)"""
    async with connection(pool, "renew_leases") as con:
        result = await con.execute(
            "UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $2)"
            " WHERE owner = $1 AND turn_id = ANY($3::bigint[])"
            " AND expires_at > '-infinity'",  # never a released one
            owner, lease_seconds, turn_ids)
    return int(result.split()[-1])


"""SQL for LLM conversations: turns, their messages, and the per-appID lease.

A conversation is (owner_id, appID): the owner is a user's id, or ANONYMOUS for requests
without credentials, and the same appID under two owners is two conversations.  Every
function here that reaches a conversation's rows takes the owner and every statement it
sends names it, as the keys do (db/migrations/0021_owners.sql).  A turn is (owner_id, turn
id) likewise.

A turn's incoming messages are stored when it begins, as pending; the turn enters the
conversation when it ends, with its reply, in one transaction (the SQL functions that do
it: db/functions/begin_turn.sql and end_turn.sql).  Every function here takes
the pool and holds a connection only for its own statement: never across an LLM stream.
Call as `await begin_turn(pool, owner_id, app_id, ...)`.
"""

import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import asyncpg

import jsonfmt
from db.history_cache import HistoryCache
from db.pool import connection

# The owner of every conversation a request without credentials has (no user has id 0).
ANONYMOUS = 0

# A turn as this process keeps track of it: (owner_id, turn id).
TurnKey = tuple[int, int]

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
              " FROM begin_turn($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
END_TURN = "SELECT end_turn($1, $2, $3, $4, $5, $6, $7, $8, true, $9)"
# Several turns' END_TURN in one statement and one transaction, each row's outcome by its
# position (1-based) in the arrays.
END_TURNS = ("SELECT n, end_turn(o, t, s, e, c, x::jsonb, m, k, true, p)"
             " FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],"
             " $6::text[], $7::text[], $8::integer[], $9::integer[])"
             " WITH ORDINALITY AS u(o, t, s, e, c, x, m, k, p, n)")


def _split(turns: Optional[list[TurnKey]]) -> tuple[Optional[list[int]], Optional[list[int]]]:
    """(owner ids, turn ids) of *turns*, as the statements take them; (None, None) for none."""
    if not turns:
        return None, None
    return [owner_id for owner_id, _ in turns], [turn_id for _, turn_id in turns]


async def begin_turn(pool: asyncpg.Pool, owner_id: int, app_id: str, process: str,
                     lease_seconds: float, messages: list[dict], *, replace: bool = False,
                     resend_seconds: float = 0.0, budget: Optional[int] = None,
                     context: Optional[int] = None, delivered: Optional[list[TurnKey]] = None,
                     waited_for: Optional[int] = None, cache: Optional[HistoryCache] = None
                     ) -> tuple[Optional[int], Optional[list[dict]], Window, Optional[dict]]:
    """Take the lease of *owner_id*'s conversation *app_id* for this *process* and store
    *messages* as a pending turn of it, in one round trip.

    Returns (turn id, the conversation before this turn that fits *budget* tokens with
    the new messages: system prompts and the newest whole turns, what was sent and left
    out, None).  *budget* None: the
    whole conversation.  With *replace*, the appID's earlier turns are deleted.
    When *messages* resend the appID's last turn, which ended (complete or failed) less
    than *resend_seconds* ago but was never delivered, nothing is stored and the result
    is (that turn's id, None, an empty Window, its stored reply as {content, extra,
    model, tokens, status, error}).  *delivered*: turns whose end reached their client
    since the last call, as (owner_id, turn id) (see mark_delivered), recorded first.  When
    the appID is busy the
    turn id is None and the last item is {"waiting_for": the running turn's id}; pass that
    id back as *waited_for* on the next try, so that a double send of the same messages
    is answered from that turn's storage instead of being asked and stored twice.  With
    *cache* (db/history_cache.py), turns it holds are not read again.
    """
    if cache is not None and replace:
        cache.forget(owner_id, app_id)
    known = cache.snapshot(owner_id, app_id) if cache is not None else {}
    delivered_owners, delivered_ids = _split(delivered)
    async with connection(pool, "begin_turn") as con:
        row = await con.fetchrow(
            BEGIN_TURN, owner_id, app_id, process, lease_seconds, _pending(messages), replace,
            resend_seconds, budget, context, delivered_ids, delivered_owners, waited_for,
            list(known) or None)
    history = row["history"]
    if history is not None and cache is not None:  # (without one, all was fetched, in order)
        history = cache.assemble(owner_id, app_id, known, history, row["history_turns"],
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
            row = await con.fetchrow(BEGIN_TURN, ANONYMOUS, app_id, "chatterd-ready", 1.0,
                                     _pending([{"role": "user", "content": f"ready {n}"}]),
                                     False, 120.0, 8192, 8192, delivered, delivered and [ANONYMOUS],
                                     None, None)
            if n == 1:
                await con.fetchval(END_TURN, ANONYMOUS, row["turn_id"], "complete", None, "ready",
                                   None, "ready", 1, row["sent_tokens"] + 1)
            else:
                await con.fetch(END_TURNS, [ANONYMOUS], [row["turn_id"]], ["complete"], [None],
                                ["ready"], [None], ["ready"], [1], [row["sent_tokens"] + 1])
            delivered = [row["turn_id"]]
    finally:
        await transaction.rollback()


async def mark_delivered(pool: asyncpg.Pool, turns: list[TurnKey]) -> None:
    """Record that these turns' ends reached their clients (so a resend is a new turn).
    begin_turn takes the same list, so this runs only when no turn begins for a while."""
    owner_ids, turn_ids = _split(turns)
    async with connection(pool, "mark_delivered") as con:
        await con.execute(
            "UPDATE turns SET delivered = true WHERE (owner_id, id) IN ("
            " SELECT t.owner_id, t.id FROM turns t"
            " JOIN unnest($1::bigint[], $2::bigint[]) AS d(owner_id, id)"
            " ON t.owner_id = d.owner_id AND t.id = d.id"
            " WHERE NOT t.delivered FOR UPDATE OF t SKIP LOCKED)", owner_ids, turn_ids)


async def end_turn(pool: asyncpg.Pool, owner_id: int, turn_id: int, status: str,
                   error: Optional[str], reply: Optional[Reply]) -> str:
    """End *owner_id*'s turn (with its reply, if any) and release the lease, in one
    transaction.

    Idempotent.  Returns 'stored', 'stored-suspect' (stored, but Ollama counted fewer
    prompt tokens than are known to have been sent: it must have cut the prompt),
    'already' (an earlier call did it) or 'lost' (the turn was abandoned because its
    lease was taken over, or *owner_id* has no such turn).  The reply's prompt_tokens
    teaches the token counts of what the turn sent (db/functions/learn_tokens.sql).
    """
    async with connection(pool, "end_turn") as con:
        if reply is None:
            return await con.fetchval(
                "SELECT end_turn($1, $2, $3, $4, NULL, NULL, NULL, NULL, false, NULL::integer)",
                owner_id, turn_id, status, error)
        if reply.before or reply.after:
            return await con.fetchval(
                "SELECT end_turn($1, $2, $3, $4, $5, $6, $7, $8, true, $9, $10, $11)",
                owner_id, turn_id, status, error, reply.content, reply.extra or None, reply.model,
                reply.tokens, reply.prompt_tokens, reply.before, reply.after)
        return await con.fetchval(END_TURN, owner_id, turn_id, status, error, reply.content,
                                  reply.extra or None, reply.model, reply.tokens,
                                  reply.prompt_tokens)


def batchable(reply: Reply) -> bool:
    """end_turns can store this reply (one without tool rounds; end_turn stores any)."""
    return not reply.before and not reply.after


async def end_turns(pool: asyncpg.Pool, ends: list[tuple[int, int, str, Optional[str], Reply]]
                    ) -> list[str]:
    """end_turn for each of *ends* (owner_id, turn_id, status, error, reply), in one
    statement and one transaction: their outcomes, in order.  Every reply must be
    batchable().  One turn's error fails them all (nothing is stored)."""
    columns: list[list[Any]] = [[] for _ in range(9)]
    for owner_id, turn_id, status, error, reply in ends:
        for column, value in zip(columns, (
                owner_id, turn_id, status, error, reply.content,
                jsonfmt.dumps(reply.extra) if reply.extra else None, reply.model,
                reply.tokens, reply.prompt_tokens)):
            column.append(value)
    async with connection(pool, "end_turns") as con:
        rows = await con.fetch(END_TURNS, *columns)
    outcomes = dict(rows)
    return [outcomes[n] for n in range(1, len(ends) + 1)]


async def tool_schemas(pool: asyncpg.Pool, owner_id: int, app_id: str,
                       replace: Optional[list] = None) -> list:
    """The client tool schemas (Ollama `tools`) kept with *owner_id*'s conversation *app_id*.

    With *replace* (the client sent its tools), they become the conversation's and are
    returned; otherwise the ones kept (none: []).  One statement.
    """
    async with connection(pool, "tool_schemas") as con:
        if replace is not None:
            await con.execute(
                "INSERT INTO tool_schemas AS s (owner_id, appid, schemas) VALUES ($1, $2, $3)"
                " ON CONFLICT (owner_id, appid)"
                " DO UPDATE SET schemas = EXCLUDED.schemas, updated_at = now()",
                owner_id, app_id, replace)
            return replace
        kept = await con.fetchval(
            "SELECT schemas FROM tool_schemas WHERE owner_id = $1 AND appid = $2", owner_id, app_id)
    return kept if isinstance(kept, list) else []


async def renew_leases(pool: asyncpg.Pool, process: str, lease_seconds: float,
                       turns: list[TurnKey]) -> int:
    """Extend the leases *process* holds for its running *turns*; return how many.
    (A turn whose end could not be stored is not running: its lease is left to expire.)
    A lease locked meanwhile is skipped: its turn is ending (end_turns locks several
    leases in its own order, so waiting for it could deadlock), and a lease is renewed
    three times within its length anyway."""
    owner_ids, turn_ids = _split(turns)
    async with connection(pool, "renew_leases") as con:
        result = await con.execute(
            "UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $2)"
            " WHERE (owner_id, appid) IN ("
            " SELECT l.owner_id, l.appid FROM leases l"
            " JOIN unnest($3::bigint[], $4::bigint[]) AS r(owner_id, turn_id)"
            " ON l.owner_id = r.owner_id AND l.turn_id = r.turn_id"
            " WHERE l.owner = $1 AND l.expires_at > '-infinity'"  # never a released one
            " FOR UPDATE OF l SKIP LOCKED)",
            process, lease_seconds, owner_ids, turn_ids)
    return int(result.split()[-1])


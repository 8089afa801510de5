"""SQL for LLM conversations, one row per message, in `seq` order.

Every function takes the pool and holds a connection only for its own statements:
never across an LLM stream.  Call as `await append_messages(pool, ...)`.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import asyncpg

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


def _rows(app_id: str, messages: list[dict]) -> list[tuple]:
    return [(app_id, m["role"], m["content"],
             {k: m[k] for k in EXTRA_FIELDS if k in m} or None) for m in messages]


_INSERT = "INSERT INTO messages (appid, role, content, extra) VALUES ($1, $2, $3, $4) RETURNING seq"


async def append_messages(pool: asyncpg.Pool, app_id: str, messages: list[dict]) -> list[int]:
    """Store the incoming messages of one turn atomically; return their seqs."""
    async with connection(pool, "append_messages") as con:
        async with con.transaction():
            return [await con.fetchval(_INSERT, *row) for row in _rows(app_id, messages)]


async def delete_messages(pool: asyncpg.Pool, seqs: list[int]) -> None:
    """Undo append_messages for a turn that was rejected before it started."""
    async with connection(pool, "delete_messages") as con:
        await con.execute("DELETE FROM messages WHERE seq = ANY($1::bigint[])", seqs)


async def replace_conversation(pool: asyncpg.Pool, app_id: str, messages: list[dict]) -> None:
    """Forget the appID's conversation and start it again with *messages* (one transaction)."""
    async with connection(pool, "replace_conversation") as con:
        async with con.transaction():
            await con.execute("DELETE FROM messages WHERE appid = $1", app_id)
            await con.executemany(_INSERT.replace(" RETURNING seq", ""), _rows(app_id, messages))


async def load_history(pool: asyncpg.Pool, app_id: str) -> list[dict]:
    """The conversation as Ollama messages: system prompts first, then in stored order.

    Replies that ended before producing any text are skipped: they would only
    show the model an empty assistant turn.
    """
    async with connection(pool, "load_history") as con:
        rows = await con.fetch(
            "SELECT role, content, extra FROM messages"
            " WHERE appid = $1 AND (status = 'complete' OR content <> '')"
            " ORDER BY role <> 'system', seq", app_id)
    history = []
    for r in rows:
        message = {"role": r["role"], "content": r["content"]}
        if r["extra"]:
            message.update(r["extra"])
        history.append(message)
    return history


async def store_reply(pool: asyncpg.Pool, app_id: str, reply: Reply) -> int:
    async with connection(pool, "store_reply") as con:
        return await con.fetchval(
            "INSERT INTO messages (appid, role, content, extra, status, error, model, tokens)"
            " VALUES ($1, 'assistant', $2, $3, $4, $5, $6, $7) RETURNING seq",
            app_id, reply.content, reply.extra or None, reply.status, reply.error,
            reply.model, reply.tokens)


async def conversation(pool: asyncpg.Pool, app_id: str) -> list[asyncpg.Record]:
    """Every stored row of the appID, in order (for inspection and tests)."""
    async with connection(pool, "conversation") as con:
        return await con.fetch(
            "SELECT seq, role, content, extra, status, error, model, tokens"
            " FROM messages WHERE appid = $1 ORDER BY seq", app_id)

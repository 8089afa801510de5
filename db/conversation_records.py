"""SQL for an owner's conversations as a whole: list them, read one back, title it, delete
one or all of them (handlers/conversations.py; DELETE /auth/me).

Each statement is keyed by (owner_id, appid), as every statement about a conversation is
(db/migrations/0021_owners.sql): an appID of another owner is simply not there.  A
conversation's row in `conversation_sizes` holds what the list shows (its title, latest
model, size and last change); its messages are those of its ended turns.
"""

import datetime
from typing import Any, Optional

import asyncpg

from db.conversations import ANONYMOUS, EXTRA_FIELDS
from db.pool import connection

MAX_TITLE = 200  # characters (the column's CHECK says the same)
# The turns that are part of a conversation: ended (rejected and abandoned ones never are).
ENDED = ("complete", "interrupted", "failed")


async def list_conversations(pool: asyncpg.Pool, owner_id: int, limit: int,
                             before: Optional[tuple[datetime.datetime, str]] = None
                             ) -> list[asyncpg.Record]:
    """The owner's conversations, most recently changed first, at most *limit*; with
    *before* (updated_at, appid) of the last one of a page, the next page."""
    async with connection(pool, "list_conversations") as con:
        if before is None:
            return await con.fetch(
                "SELECT appid, title, model, messages, updated_at FROM conversation_sizes"
                " WHERE owner_id = $1 ORDER BY updated_at DESC, appid DESC LIMIT $2",
                owner_id, limit)
        return await con.fetch(
            "SELECT appid, title, model, messages, updated_at FROM conversation_sizes"
            " WHERE owner_id = $1 AND (updated_at, appid) < ($2, $3)"
            " ORDER BY updated_at DESC, appid DESC LIMIT $4", owner_id, before[0], before[1], limit)


async def read_conversation(pool: asyncpg.Pool, owner_id: int, app_id: str) -> Optional[dict]:
    """The conversation as GET /conversations/{appID} shows it, or None when the owner has
    none under *app_id*: its messages in order (those of its ended turns), each with the
    number of its turn (1 for the first shown), that turn's status and its time."""
    async with connection(pool, "read_conversation") as con:
        head = await con.fetchrow(
            "SELECT title, model, updated_at FROM conversation_sizes"
            " WHERE owner_id = $1 AND appid = $2", owner_id, app_id)
        rows = await con.fetch(
            "SELECT m.role, m.content, m.extra, m.error, m.model, m.created_at, t.status,"
            " dense_rank() OVER (ORDER BY m.turn_id) AS turn"
            " FROM messages m JOIN turns t ON t.owner_id = m.owner_id AND t.id = m.turn_id"
            " WHERE m.owner_id = $1 AND m.appid = $2 AND t.owner_id = $1 AND t.appid = $2"
            " AND t.status = ANY($3::text[]) ORDER BY m.turn_id, m.seq",
            owner_id, app_id, list(ENDED))
    if head is None and not rows:
        return None
    messages = [_shown(r) for r in rows]
    if head is not None:
        title, model, updated_at = head["title"], head["model"], head["updated_at"]
    else:  # a conversation stored by other means (the course import): no row of its own
        title = None
        model = next((r["model"] for r in reversed(rows) if r["model"]), None)
        updated_at = rows[-1]["created_at"]
    return {"appID": app_id, "title": title, "model": model,
            "updated_at": updated_at.isoformat(), "messages": messages}


def _shown(row: Any) -> dict:
    message = {"role": row["role"], "content": row["content"]}
    extra = row["extra"]
    if isinstance(extra, dict):
        message.update((k, extra[k]) for k in EXTRA_FIELDS if k in extra)
    message.update(turn=row["turn"], status=row["status"], time=row["created_at"].isoformat())
    if row["model"] is not None:
        message["model"] = row["model"]
    if row["error"] is not None:
        message["error"] = row["error"]
    return message


async def set_title(pool: asyncpg.Pool, owner_id: int, app_id: str,
                    title: Optional[str]) -> Optional[asyncpg.Record]:
    """Title the conversation (None removes it); its row as listed, or None when the owner
    has no conversation under *app_id*."""
    async with connection(pool, "set_title") as con:
        return await con.fetchrow(
            "SELECT appid, title, model, messages, updated_at"
            " FROM set_conversation_title($1, $2, $3)", owner_id, app_id, title)


async def delete_conversation(pool: asyncpg.Pool, owner_id: int, app_id: str) -> str:
    """Delete everything of the conversation in one transaction: 'deleted', 'missing' (the
    owner has none under *app_id*) or 'running' (a turn of it runs: nothing deleted)."""
    async with connection(pool, "delete_conversation") as con:
        return await con.fetchval("SELECT delete_conversation($1, $2)", owner_id, app_id)


async def delete_owner(pool: asyncpg.Pool, owner_id: int) -> int:
    """Delete every conversation of *owner_id* (a user whose account goes), in one
    transaction; return how many there were.  Turns of it still running end as lost.
    The anonymous namespace is never deleted as a whole: ValueError."""
    async with connection(pool, "delete_owner") as con:
        return await delete_owner_on(con, owner_id)


async def delete_owner_on(con: asyncpg.Connection, owner_id: int) -> int:
    """delete_owner on *con*, inside the caller's transaction if it has one (the account's
    own deletion: the user and their conversations go together or not at all)."""
    if owner_id == ANONYMOUS:
        raise ValueError("the anonymous namespace (owner 0) is not deleted as a whole")
    return await con.fetchval("SELECT delete_owner($1)", owner_id)

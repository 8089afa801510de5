"""SQL for the public board.  Call as `await post_chatt(pool, ...)`."""

from typing import Optional

import asyncpg

from db.pool import connection


async def post_chatt(pool: asyncpg.Pool, name: str, message: str,
                     user_id: Optional[int] = None) -> None:
    """Post a chatt; *user_id*: the account that posted it (None: anonymous)."""
    async with connection(pool, "post_chatt") as con:
        await con.execute("INSERT INTO chatts (name, message, user_id) VALUES ($1, $2, $3)",
                          name, message, user_id)


async def get_chatts(pool: asyncpg.Pool) -> list[list[str]]:
    """All chatts, oldest first, as [name, message, id, ISO-8601 time] rows."""
    async with connection(pool, "get_chatts") as con:
        rows = await con.fetch("SELECT name, message, id, time FROM chatts ORDER BY seq")
    return [[r["name"], r["message"], str(r["id"]), r["time"].isoformat()] for r in rows]

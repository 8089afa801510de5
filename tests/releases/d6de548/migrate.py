"""Versioned schema migrations: db/migrations/NNNN_name.sql, applied in order, once.

Several chatterd processes may start together against one database; an advisory
lock makes exactly one of them apply what is missing.
"""

import logging
import re
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
LOCK_KEY = 0x63686174  # "chat"

log = logging.getLogger("chatterd.db")


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file, in version order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = re.fullmatch(r"(\d+)_(\w+)\.sql", path.name)
        if m:
            found.append((int(m.group(1)), m.group(2), path.read_text()))
    return found


async def migrate(pool: asyncpg.Pool) -> list[int]:
    """Apply the missing migrations; return the versions applied now."""
    applied_now = []
    async with pool.acquire() as con:
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in available():
                if version in done:
                    continue
                await con.execute(sql)
                await con.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                  version, name)
                log.info("applied migration %04d_%s", version, name)
                applied_now.append(version)
    return applied_now

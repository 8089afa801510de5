"""Versioned schema migrations: db/migrations/NNNN_name.sql, applied in order, once.

Everything chatterd owns lives in its own PostgreSQL schema, `chatterd`, so it never
clashes with other tables in the database (the course's `public.chatts`, for one).
Every pooled connection has `search_path` set to it (db/pool.py) and the migrations run
with it, so the SQL here and in db/migrations/ uses unqualified names.

Several chatterd processes may start together against one database; an advisory
lock makes exactly one of them apply what is missing.  Under the same lock, a database
that an older chatterd set up in `public` is moved into the schema, once.
"""

import logging
import re
from pathlib import Path

import asyncpg

SCHEMA = "chatterd"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
LOCK_KEY = 0x63686174  # "chat"

# What chatterd created in `public` before it had its own schema (migrations 0001, 0002).
# Sequences owned by their columns (identities, turn_ids) move with their tables.
LEGACY_TABLES = ("schema_migrations", "chatts", "messages", "turns", "leases")
LEGACY_FUNCTIONS = ("conversation_of", "begin_turn", "end_turn")

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
    """Create the schema, adopt an older layout from `public`, apply the missing
    migrations; return the versions applied now."""
    applied_now = []
    async with pool.acquire() as con:
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            await _ensure_schema(con)
            await con.execute(f"SET LOCAL search_path = {SCHEMA}")
            await _adopt_public_layout(con)
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


async def _ensure_schema(con: asyncpg.Connection) -> None:
    # Checked first: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege on the
    # database, which a role whose schema an administrator made for it may not have.
    if not await con.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", SCHEMA):
        await con.execute(f"CREATE SCHEMA {SCHEMA}")
        log.info("created schema %s", SCHEMA)


async def _adopt_public_layout(con: asyncpg.Connection) -> None:
    """Move the tables and functions an older chatterd made in `public` into the schema.

    Recognised by chatterd's own marks: public.schema_migrations with a `name` column,
    public.chatts with its `seq` column, and public.messages.  Anything else in `public`
    (the course's chatts, another application's tables) is left alone.
    """
    legacy = await con.fetchval("""
        SELECT to_regclass('public.messages') IS NOT NULL
           AND EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'public'
                        AND table_name = 'schema_migrations' AND column_name = 'name')
           AND EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'public'
                        AND table_name = 'chatts' AND column_name = 'seq')""")
    if not legacy:
        return
    if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.schema_migrations"):
        log.warning("public holds tables of an older chatterd, but schema %s is set up already;"
                    " the ones in public are left alone", SCHEMA)
        return
    moved = []
    for table in LEGACY_TABLES:
        if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{table}"):
            await con.execute(f"ALTER TABLE public.{table} SET SCHEMA {SCHEMA}")
            moved.append(table)
    functions = await con.fetch(
        "SELECT p.oid::regprocedure::text AS signature FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace AND p.proname = ANY($1::text[])",
        list(LEGACY_FUNCTIONS))
    for f in functions:
        # Still in public, so the signature text is qualified or resolvable as written.
        await con.execute(f"ALTER FUNCTION {_qualified(f['signature'])} SET SCHEMA {SCHEMA}")
        moved.append(f["signature"])
    log.info("moved chatterd's tables and functions from public into schema %s: %s",
             SCHEMA, ", ".join(moved))


def _qualified(signature: str) -> str:
    return signature if signature.startswith("public.") else "public." + signature

"""chatterd's schema: versioned migrations for its tables, one file per SQL function.

* db/migrations/NNNN_name.sql: table changes and data moves, applied in order, once each
  (the versions applied are kept in `schema_migrations`).
* db/functions/<name>.sql: the current definition of SQL function <name>, every overload of
  it.  A file is applied again whenever its text differs from the text last applied (kept
  as a sha256 in `schema_functions`), as Flyway applies its repeatable migrations: to read
  or change a function, open its file.

Everything chatterd owns lives in its own PostgreSQL schema, `chatterd`, so it never
clashes with other tables in the database (the course's `public.chatts`, for one).
Every pooled connection has `search_path` set to it (db/pool.py) and the migrations and
function files run with it, so their SQL uses unqualified names; a function's
`SET search_path FROM CURRENT` keeps that schema whoever calls it.

Several chatterd processes may start together against one database: in one transaction,
under an advisory lock, exactly one of them moves a database that an older chatterd set up
in `public` into the schema (once), applies the missing versioned migrations, then applies
the function files whose text changed.  So a versioned migration cannot call a function of
db/functions/ (on a new database it does not exist yet): a backfill writes its SQL out.

A function file holds `CREATE OR REPLACE FUNCTION` statements.  CREATE OR REPLACE cannot
change a function's arguments or result type: a file that changes them drops the old form
first, at its top (`DROP FUNCTION IF EXISTS name(old argument types);`).  A function that
nothing calls any more is dropped by a versioned migration, and its file deleted.
"""

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

SCHEMA = "chatterd"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
FUNCTIONS_DIR = Path(__file__).with_name("functions")
LOCK_KEY = 0x63686174  # "chat"
# Seconds a versioned migration may take: one that moves data (0015 splits imported
# conversations) takes longer than --db-timeout on a large database.
MIGRATION_TIMEOUT = 3600.0

# What chatterd created in `public` before it had its own schema (migrations 0001, 0002).
# Sequences owned by their columns (identities, turn_ids) move with their tables.
LEGACY_TABLES = ("schema_migrations", "chatts", "messages", "turns", "leases")
LEGACY_FUNCTIONS = ("conversation_of", "begin_turn", "end_turn")

log = logging.getLogger("chatterd.db")


@dataclass
class Migrated:
    """What one migrate() applied: versioned migrations, and function files by name."""

    versions: list[int] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file, in version order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = re.fullmatch(r"(\d+)_(\w+)\.sql", path.name)
        if m:
            found.append((int(m.group(1)), m.group(2), path.read_text()))
    return found


def function_files() -> list[tuple[str, str]]:
    """(function name, sql) for every function file, in name order."""
    return [(path.stem, path.read_text()) for path in sorted(FUNCTIONS_DIR.glob("*.sql"))]


async def migrate(pool: asyncpg.Pool) -> Migrated:
    """Create the schema, adopt an older layout from `public`, apply the missing
    migrations and the changed function files; return what was applied now."""
    migrated = Migrated()
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
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_functions ("
                " name text PRIMARY KEY, sha256 text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")}
            known = set()
            for version, name, sql in available():
                known.add(version)
                if version in done:
                    continue
                if re.sub(r"--[^\n]*", "", sql).strip():  # asyncpg fails on comments alone
                    await con.execute(sql, timeout=MIGRATION_TIMEOUT)
                await con.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                  version, name)
                log.info("applied migration %04d_%s", version, name)
                migrated.versions.append(version)
            newer = sorted(done - known)
            if newer:
                # An older chatterd than the one that migrated the database: its function
                # files would put older functions back.
                log.warning("the database has migrations this chatterd does not know (%s);"
                            " its functions are left as they are",
                            ", ".join(f"{v:04d}" for v in newer))
            else:
                migrated.functions = await _apply_functions(con)
    return migrated


async def _apply_functions(con: asyncpg.Connection) -> list[str]:
    """Apply every function file whose text is not the one last applied (or whose function
    is missing), in name order; return their names."""
    files = function_files()
    recorded = {r["name"]: r["sha256"] for r in await con.fetch(
        "SELECT f.name, f.sha256 FROM schema_functions f WHERE EXISTS (SELECT 1 FROM pg_proc p"
        " WHERE p.pronamespace = $1::regnamespace AND p.proname = f.name)", SCHEMA)}
    await con.execute("DELETE FROM schema_functions WHERE name <> ALL($1::text[])",
                      [name for name, _ in files])
    changed = []
    for name, sql in files:
        digest = hashlib.sha256(sql.encode()).hexdigest()
        if recorded.get(name) != digest:
            changed.append((name, sql, digest))
    if not changed:
        return []
    # Bodies are checked once every changed file is in, so that a SQL function may use one
    # whose file sorts after its own (CREATE checks a SQL function's body as it runs).
    await con.execute("SET LOCAL check_function_bodies = off")
    for name, sql, digest in changed:
        await con.execute(sql)
        await con.execute(
            "INSERT INTO schema_functions (name, sha256) VALUES ($1, $2) ON CONFLICT (name)"
            " DO UPDATE SET sha256 = EXCLUDED.sha256, applied_at = now()", name, digest)
    await con.execute("SET LOCAL check_function_bodies = on")
    names = [name for name, _, _ in changed]
    for row in await con.fetch(
            "SELECT p.oid, l.lanvalidator::regproc::text AS validator"
            " FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
            " WHERE p.pronamespace = $1::regnamespace AND p.proname = ANY($2::text[])"
            " AND l.lanvalidator <> 0", SCHEMA, names):
        await con.execute(f"SELECT {row['validator']}($1)", row["oid"])
    log.info("applied function files: %s", ", ".join(names))
    return names


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

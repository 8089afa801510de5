"""Adopting a course server's database: import the course's `public.chatts` table.

The course's back end keeps the public board and every app's LLM conversation in one
table, `chatts(name | username, message, id uuid, time timestamp, appID[, toolcalls,
toolschemas])`.  chatterd imports it into its own tables (the SQL is the function
course_import() in db/functions/course_import.sql):

* on its first start against such a database, once (`import_on_first_start`);
* on request, `python chatterd.py --import-course` (`import_now`), for rows the course
  server added since: only rows never seen before are imported.

Each import is one transaction, under the migrations' advisory lock, so processes
starting together import once.  The course table is only read.  The conversations go to
the anonymous namespace: the course's apps send no credentials, so that is where they
find them again.
"""

import logging
from typing import Any, Optional

import asyncpg

from db.conversations import ANONYMOUS
from db.migrate import LOCK_KEY

COURSE_TABLE = "public.chatts"
IMPORT_TIMEOUT = 3600.0  # seconds; a large course table takes longer than --db-timeout

log = logging.getLogger("chatterd.db")


class NoCourseTable(Exception):
    """The database has no course chatts table to import."""


async def import_on_first_start(pool: asyncpg.Pool) -> Optional[dict[str, Any]]:
    """Import the course table if the database has one and it was never imported."""
    return await _import(pool, first_start=True)


async def import_now(pool: asyncpg.Pool) -> dict[str, Any]:
    """Import the course rows not imported before; raise NoCourseTable without one."""
    result = await _import(pool, first_start=False)
    assert result is not None
    return result


async def _import(pool: asyncpg.Pool, *, first_start: bool) -> Optional[dict[str, Any]]:
    async with pool.acquire() as con:
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            layout = await _course_layout(con)
            if layout is None:
                if first_start:
                    return None
                raise NoCourseTable(f"nothing to import: the database has no course table"
                                    f" {COURSE_TABLE} (name or username, message, id uuid, time)")
            if first_start and await con.fetchval("SELECT EXISTS (SELECT 1 FROM course_imports)"):
                return None
            result = await con.fetchval("SELECT course_import($1::regclass, $2)", COURSE_TABLE,
                                        ANONYMOUS, timeout=IMPORT_TIMEOUT)
            # A bulk load: the plans of the next turns need the tables' new statistics now,
            # not when autovacuum gets to them.
            await con.execute("ANALYZE turns, messages", timeout=IMPORT_TIMEOUT)
    log.info("%s", describe(result))
    return result


async def _course_layout(con: asyncpg.Connection) -> Optional[dict[str, Any]]:
    if not await con.fetchval("SELECT to_regclass($1) IS NOT NULL", COURSE_TABLE):
        return None
    layout = await con.fetchval("SELECT course_layout($1::regclass)", COURSE_TABLE)
    if layout is None:
        log.warning("%s is not the course's chatts table (it needs name or username, message,"
                    " id uuid and time); not imported", COURSE_TABLE)
    return layout


def describe(result: dict[str, Any]) -> str:
    """The log line for an import: its counts, and why rows were skipped."""
    skipped = result["skipped"]
    line = (f"imported the course's {result['source']} (import {result['import']}):"
            f" {result['board']} board post(s), {result['messages']} message(s)"
            f" in {result['appids']} appID(s) as {result['turns']} turn(s),"
            f" tool schemas of {result['tool_schemas']} appID(s);"
            f" skipped {sum(skipped.values())} row(s)")
    if skipped:
        line += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())) + ")"
    if result.get("toolcalls_dropped"):
        line += f"; toolcalls not a JSON array, left out: {result['toolcalls_dropped']}"
    return line

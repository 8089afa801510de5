"""Opening the database at start-up: the embedded server, the pool, the schema, the course
import, with any failure turned into one line and exit code 1 (never a traceback)."""

import asyncio
import logging
from typing import Any

import asyncpg

from db import conversations, course_import, embedded, migrate, pool as db_pool
from settings import Settings

log = logging.getLogger("chatterd.db")


def describe_error(e: BaseException) -> str:
    """One line for a start-up failure: what PostgreSQL or the OS said, no traceback."""
    text = " ".join(str(e).split()) or repr(e)
    detail = getattr(e, "detail", None)
    if isinstance(e, asyncpg.PostgresError) and detail:
        text += f" ({' '.join(str(detail).split())})"
    return f"{type(e).__name__}: {text}"


async def open_database(config: Settings, *, import_course: bool, ready: bool = True) -> Any:
    """The pool, on a database whose schema is up to date (and, with *import_course*, whose
    course table, if any, was imported once), with *ready* its connections opened and
    readied for turns (ready_pool).  Any failure is one line and exit code 1."""
    step = "cannot start the embedded PostgreSQL"
    pool = None
    try:
        dsn = config.database_url
        if not dsn:
            dsn = await embedded.ensure_database(embedded.start(config.data_dir))
        step = "cannot open the database"
        pool = await db_pool.create_pool(dsn, config)
        step = "cannot set up chatterd's schema in the database"
        await migrate.migrate(pool)
        if import_course:
            step = "cannot import the course's chatts table"
            await course_import.import_on_first_start(pool)
    except Exception as e:
        if isinstance(e, db_pool.CONNECTION_ERRORS):
            step = "the database is unreachable"
        if pool is not None:
            pool.terminate()
        raise SystemExit(f"chatterd: {step}: {describe_error(e)}") from None
    if ready:
        await ready_pool(pool, config.db_pool_size, config.db_timeout)  # never fatal
    return pool


async def ready_pool(pool: asyncpg.Pool, size: int, timeout: float) -> int:
    """Open *size* connections and ready each for turns (conversations.ready_connection),
    so that the first requests after a start neither connect nor pay a cold backend's
    first turn.  Best effort, never raising: a connection that cannot be opened is opened
    on demand, one that cannot be readied pays on its first turn, in one log line.
    Returns how many are ready."""
    held: list[asyncpg.Connection] = []

    async def ready_one() -> None:
        con = await pool.acquire(timeout=timeout)
        held.append(con)  # held until all are ready, so each is its own connection
        await asyncio.wait_for(conversations.ready_connection(con), timeout)

    results = await asyncio.gather(*(ready_one() for _ in range(size)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    for con in held:
        try:
            await pool.release(con)  # its reset rolls back whatever a timeout left open
        except Exception as e:
            failures.append(e)
    if failures:
        log.warning("%d of %d database connections not readied at start (%s); their first "
                    "turns pay for it", min(len(failures), size), size, describe_error(failures[0]))
    return max(size - len(failures), 0)

"""The asyncpg pool, and the one exception handlers need to know about."""

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

import asyncpg

import jsonfmt
import metrics
from db.migrate import SCHEMA
from settings import Settings

log = logging.getLogger("chatterd.db")


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached or the connection broke (clients get 503)."""


# Errors that mean "the database is not there", as opposed to "this statement is wrong".
# InternalClientError is what asyncpg raises for an idle pooled connection that had
# already received the server's shutdown ("cannot switch to state 12").
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,     # ConnectionDoesNotExistError, ConnectionFailureError...
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.InternalServerError,
)


async def _init_connection(con: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await con.set_type_codec(typename, schema="pg_catalog", format="text",
                                 encoder=jsonfmt.dumps, decoder=jsonfmt.loads)


async def _reset_connection(con: asyncpg.Connection) -> None:
    """Before a connection goes back to the pool.  chatterd keeps no session state (every
    SET and advisory lock is transaction-scoped, nothing LISTENs), so asyncpg's default
    reset (RESET ALL, CLOSE ALL, UNLISTEN *, unlock all: a round trip per release) is
    only needed for an unfinished transaction, which is rolled back."""
    if con.is_in_transaction():
        await con.execute("ROLLBACK")


async def create_pool(dsn: str, config: Settings) -> asyncpg.Pool:
    """Create the pool on the running loop: at most --db-pool-size connections, each
    statement and connect limited to --db-timeout seconds.  No connection is opened until
    first use, so chatterd starts (and reports 503) even while PostgreSQL is down.  Every
    connection works in chatterd's own schema (unqualified names resolve there, nowhere
    else).  A connection unused for --db-idle-timeout seconds is closed (0: kept open)."""
    return await asyncpg.create_pool(
        dsn, min_size=0, max_size=config.db_pool_size, init=_init_connection,
        reset=_reset_connection, server_settings={"search_path": SCHEMA},
        command_timeout=config.db_timeout, timeout=config.db_timeout,
        max_inactive_connection_lifetime=config.db_idle_timeout)


@contextlib.asynccontextmanager
async def connection(pool: asyncpg.Pool, operation: str,
                     timeout: float = 10.0) -> AsyncIterator[asyncpg.Connection]:
    """`async with connection(pool, "name") as con:` — a pooled connection, timed under
    *operation* in the metrics, with connection failures turned into DatabaseUnavailable.

    After a block that went well the caller goes on at once and the connection returns to
    the pool in the background: asyncpg's release runs as a task of its own, so awaiting it
    costs two turns of the event loop, which under load is tens of milliseconds on the path
    of a stream's first token (begin_turn) and of its `done` (end_turn)."""
    started = time.monotonic()
    con = None
    try:
        con = await pool.acquire(timeout=timeout)
        try:
            yield con
        except BaseException:
            await pool.release(con)
            raise
        _release_soon(pool, con)
    except CONNECTION_ERRORS as e:
        if isinstance(e, TimeoutError) and not str(e):  # asyncio's timeouts say nothing
            what = "the database did not answer in time" if con is not None else \
                f"no connection within {timeout:g} s"
            raise DatabaseUnavailable(f"database unavailable: {what}") from e
        raise DatabaseUnavailable(f"database unavailable: {_describe(e)}") from e
    finally:
        metrics.DB_LATENCY.labels(operation=operation).observe(time.monotonic() - started)


_releasing: set[asyncio.Task] = set()  # (a task nothing refers to may be collected)


def _release_soon(pool: asyncpg.Pool, con: asyncpg.Connection) -> None:
    task = asyncio.ensure_future(pool.release(con))
    _releasing.add(task)
    task.add_done_callback(_released)


def _released(task: asyncio.Task) -> None:
    _releasing.discard(task)
    if not task.cancelled() and task.exception() is not None:
        # asyncpg has closed the connection; the pool opens a new one when needed.
        log.warning("a database connection could not be returned to the pool: %s",
                    _describe(task.exception()))


async def ping(pool: asyncpg.Pool) -> None:
    """Raise DatabaseUnavailable unless a trivial query succeeds."""
    async with connection(pool, "ping", timeout=3.0) as con:
        try:
            await con.fetchval("SELECT 1", timeout=3.0)
        except CONNECTION_ERRORS as e:
            raise DatabaseUnavailable(f"database unavailable: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    """The exception's type, and its message when it has one."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

"""db.startup: the pool is opened and readied for turns at start, leaving nothing stored,
and a connection that cannot be opened then is left for later, in one log line."""

import asyncio
import logging
import uuid

import asyncpg

import settings
from db import conversations, embedded, migrate, pool as db_pool
from db.conversations import ANONYMOUS
from db.startup import open_database, ready_pool
from tests.support import database_url, read_conversation


def _options(dsn: str, size: int) -> settings.Settings:
    return settings.defaults(database_url=dsn, db_pool_size=size)


async def _fresh_database() -> str:
    """A new, migrated database; its DSN."""
    name = f"startup_{uuid.uuid4().hex[:10]}"
    admin = database_url().replace("/chatterd_test?", "/postgres?", 1)
    dsn = await embedded.ensure_database(admin, name)
    pool = await db_pool.create_pool(dsn, settings.defaults(db_pool_size=1))
    try:
        await migrate.migrate(pool)
    finally:
        await pool.close()
    return dsn


async def _stored_rows(con: asyncpg.Connection) -> dict[str, int]:
    return {t: await con.fetchval(f"SELECT count(*) FROM chatterd.{t}")
            for t in ("turns", "messages", "leases", "conversation_sizes")}


async def _turn_ids_taken(con: asyncpg.Connection) -> int:
    """How many turn ids the database has handed out: every begin_turn takes one, and a
    sequence is not rolled back, so this counts the turns even of rolled-back readying."""
    last, called = await con.fetchrow("SELECT last_value, is_called FROM chatterd.turn_ids")
    return last if called else last - 1


def test_every_connection_is_opened_and_readied_at_start_and_nothing_is_stored():
    async def run():
        dsn = await _fresh_database()
        pool = await open_database(_options(dsn, 3), import_course=False)
        try:
            opened = pool.get_size()
            async with pool.acquire() as con:
                stored = await _stored_rows(con)
                calls = await _turn_ids_taken(con)
        finally:
            await pool.close()
        return opened, stored, calls

    opened, stored, calls = asyncio.run(run())
    assert opened == 3
    assert stored == {"turns": 0, "messages": 0, "leases": 0, "conversation_sizes": 0}
    assert calls == 6  # two turns (a first and a later one) on each of the 3 connections


def test_the_readied_connections_serve_turns_as_usual():
    async def run():
        dsn = await _fresh_database()
        pool = await open_database(_options(dsn, 2), import_course=False)
        try:
            turn, history, _, _ = await conversations.begin_turn(
                pool, ANONYMOUS, "after-ready", "test", 10.0, [{"role": "user", "content": "hi"}])
            stored = await conversations.end_turn(
                pool, ANONYMOUS, turn, "complete", None, conversations.Reply(content="hello"))
            rows = await read_conversation(pool, "after-ready")
        finally:
            await pool.close()
        return history, stored, [(r["role"], r["content"]) for r in rows]

    history, stored, rows = asyncio.run(run())
    assert history == []
    assert stored == "stored"
    assert rows == [("user", "hi"), ("assistant", "hello")]


def test_connections_that_cannot_be_opened_are_left_for_later_in_one_line(caplog):
    async def run():
        dsn = await _fresh_database()
        role = f"limited_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2")
            await admin.execute(f"GRANT USAGE ON SCHEMA chatterd TO {role}")
            await admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA chatterd TO {role}")
            await admin.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA chatterd TO {role}")
        finally:
            await admin.close()
        pool = await db_pool.create_pool(dsn.replace("postgres:@", f"{role}:@", 1),
                                         settings.defaults(db_pool_size=4))
        try:
            ready = await ready_pool(pool, 4, 10.0)
            opened = pool.get_size()
            async with pool.acquire() as con:  # the pool still works
                stored = await _stored_rows(con)
        finally:
            await pool.close()
        return ready, opened, stored

    with caplog.at_level(logging.WARNING, logger="chatterd.db"):
        ready, opened, stored = asyncio.run(run())
    # PostgreSQL counts a role's connections loosely while several start at once: it may
    # refuse one more than the limit asks for, never admit one more.
    assert 1 <= ready <= 2 and opened == ready, (ready, opened)
    assert stored == {"turns": 0, "messages": 0, "leases": 0, "conversation_sizes": 0}
    lines = [r.getMessage() for r in caplog.records if r.name == "chatterd.db"]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{4 - ready} of 4 database connections not readied at start"), lines
    assert "too many connections" in lines[0] and lines[0].endswith("their first turns pay for it")

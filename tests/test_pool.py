"""db.pool's errors say what happened."""

import asyncio

import pytest

import settings
from db import pool as db_pool
from tests.support import database_url


def test_pool_timeout_says_no_connection_within():
    async def run():
        pool = await db_pool.create_pool(database_url(), settings.defaults(db_pool_size=1))
        try:
            async with db_pool.connection(pool, "hold"):
                with pytest.raises(db_pool.DatabaseUnavailable) as caught:
                    async with db_pool.connection(pool, "wait", timeout=0.2):
                        pass
            return str(caught.value)
        finally:
            await pool.close()

    message = asyncio.run(run())
    assert message == "database unavailable: no connection within 0.2 s"


def test_a_slow_statement_is_not_called_a_missing_connection():
    async def run():
        pool = await db_pool.create_pool(database_url(), settings.defaults(db_pool_size=1))
        try:
            with pytest.raises(db_pool.DatabaseUnavailable) as caught:
                async with db_pool.connection(pool, "slow") as con:
                    await con.execute("SELECT pg_sleep(5)", timeout=0.2)
            return str(caught.value)
        finally:
            await pool.close()

    assert asyncio.run(run()) == "database unavailable: the database did not answer in time"


def test_the_caller_goes_on_while_its_connection_returns_to_the_pool():
    """After a block that went well nothing waits for asyncpg's release (a task of its
    own): the connection is back in the pool a moment later, reset, and serves the next."""
    async def run():
        pool = await db_pool.create_pool(database_url(), settings.defaults(db_pool_size=1))
        try:
            async with db_pool.connection(pool, "first") as con:
                await con.execute("BEGIN")  # left open: the release rolls it back
            idle_right_after = pool.get_idle_size()
            async with db_pool.connection(pool, "second", timeout=2) as con:
                in_transaction = con.is_in_transaction()
                answer = await con.fetchval("SELECT 1")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return idle_right_after, in_transaction, answer, pool.get_idle_size()
        finally:
            await pool.close()

    assert asyncio.run(run()) == (0, False, 1, 1)


def test_a_failed_block_returns_its_connection_before_the_error_goes_on():
    async def run():
        pool = await db_pool.create_pool(database_url(), settings.defaults(db_pool_size=1))
        try:
            with pytest.raises(ZeroDivisionError):
                async with db_pool.connection(pool, "fails"):
                    1 / 0
            return pool.get_idle_size()
        finally:
            await pool.close()

    assert asyncio.run(run()) == 1

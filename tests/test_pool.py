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

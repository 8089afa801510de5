"""Turns that end while the pool is busy are stored together (db/turn_ends.py), whole and each
with its own outcome; begins leave connections for them; lease renewal never waits for an
ending turn."""

import asyncio

import asyncpg
from tornado.testing import gen_test

from db import conversations
from db.conversations import ANONYMOUS, Reply
from db.startup import ready_pool
from tests.support import ChatterdTestCase
from turns import begin_slots


class TurnEndsTest(ChatterdTestCase):
    async def begin(self, count: int, prefix: str) -> list:
        keeper = self._app.turns
        return [await keeper.begin(ANONYMOUS, f"{prefix}{i}", [{"role": "user", "content": f"q{i}"}])
                for i in range(count)]

    async def while_the_pool_is_busy(self, ends) -> list:
        """Run the coroutines *ends* (turn ends) while every pooled connection is taken, until
        all but one wait for a statement; then free the pool: their outcomes."""
        held = [await self.pool.acquire() for _ in range(self.config.db_pool_size)]
        ending = asyncio.gather(*ends, return_exceptions=True)
        while self._app.turns.ends.waiting < len(ends) - 1:
            await asyncio.sleep(0)
        for con in held:
            await self.pool.release(con)
        return await ending

    @gen_test(timeout=30)
    async def test_a_turn_ending_while_the_pool_is_free_goes_at_once(self):
        await ready_pool(self.pool, self.config.db_pool_size, 10)  # as chatterd starts
        turns = await self.begin(3, "free")
        ends = self._app.turns.ends
        before = ends.statements
        await asyncio.gather(*(turn.end("complete", Reply(content="a")) for turn in turns))
        self.assertEqual(ends.statements - before, 3)  # in parallel, none waited

    @gen_test(timeout=30)
    async def test_turns_ending_while_the_pool_is_busy_share_a_statement_and_each_is_stored_whole(self):
        turns = await self.begin(20, "together")
        ends = self._app.turns.ends
        before = ends.statements
        outcomes = await self.while_the_pool_is_busy(
            [turn.end("complete", Reply(content=f"answer {i}", model="m"))
             for i, turn in enumerate(turns)])
        self.assertEqual(outcomes, [None] * 20)
        # The first end waits for a connection; the others wait for it, then go together.
        self.assertEqual(ends.statements - before, 2)
        for i in range(20):
            rows = await self.conversation(f"together{i}")
            self.assertEqual([(r["role"], r["content"], r["status"]) for r in rows],
                             [("user", f"q{i}", "complete"), ("assistant", f"answer {i}", "complete")])
        self.assertEqual(self._app.turns.running, set())

    @gen_test(timeout=30)
    async def test_one_turn_that_cannot_be_stored_fails_alone(self):
        turns = await self.begin(5, "alone")
        ends = self._app.turns.ends
        bad = turns[3]
        before = ends.statements
        # PostgreSQL refuses a NUL in text: the statement holding it fails, then each goes alone.
        outcomes = await self.while_the_pool_is_busy(
            [ends.store((ANONYMOUS, turn.id, "complete", None,
                         Reply(content="bad\x00" if turn is bad else "fine")))
             for turn in turns])
        self.assertEqual(ends.statements - before, 2)
        self.assertIsInstance(outcomes[3], asyncpg.PostgresError)
        self.assertEqual([o for i, o in enumerate(outcomes) if i != 3], ["stored"] * 4)
        statuses = {turn.app_id: [t["status"] for t in await self.turns(turn.app_id)] for turn in turns}
        self.assertEqual(statuses, {t.app_id: ["running" if t is bad else "complete"] for t in turns})

    @gen_test(timeout=30)
    async def test_an_ending_turn_does_not_delay_lease_renewal(self):
        """A lease locked by a turn's end (which, batched, locks several in its own order) is
        skipped, not waited for: waiting could deadlock against the batch."""
        keeper = self._app.turns
        ending, live = await self.begin(2, "renew")
        con = await asyncpg.connect(self.dsn())
        try:
            await con.execute("BEGIN")
            await con.execute("SELECT 1 FROM chatterd.leases WHERE turn_id = $1 FOR UPDATE", ending.id)
            renewed = await asyncio.wait_for(conversations.renew_leases(
                self.pool, keeper.owner, 10, [(ANONYMOUS, ending.id), (ANONYMOUS, live.id)]), 5)
            self.assertEqual(renewed, 1)
            await con.execute("ROLLBACK")
        finally:
            await con.close()
        self.assertEqual(await conversations.renew_leases(
            self.pool, keeper.owner, 10, [(ANONYMOUS, ending.id), (ANONYMOUS, live.id)]), 2)
        for turn in (ending, live):
            await turn.end("complete", Reply(content="a"))


def test_begins_leave_a_third_of_the_pool_and_at_most_three_connections():
    assert [begin_slots(n) for n in (1, 2, 3, 4, 6, 10, 20)] == [1, 2, 2, 3, 4, 7, 17]


class BeginSlotsTest(ChatterdTestCase):
    settings_overrides = {"db_pool_size": 6}

    @gen_test(timeout=30)
    async def test_begins_leave_connections_for_ends(self):
        keeper = self._app.turns
        begin_turn = conversations.begin_turn
        at_once = peak = 0

        async def counted(*args, **kwargs):
            nonlocal at_once, peak
            at_once += 1
            peak = max(peak, at_once)
            try:
                return await begin_turn(*args, **kwargs)
            finally:
                at_once -= 1

        conversations.begin_turn = counted
        try:
            turns = await asyncio.gather(*(
                keeper.begin(ANONYMOUS, f"slots{i}", [{"role": "user", "content": "q"}])
                for i in range(30)))
        finally:
            conversations.begin_turn = begin_turn
        self.assertEqual(peak, 4)  # begin_slots(6): two stay free
        self.assertEqual(len({t.id for t in turns}), 30)
        await asyncio.gather(*(t.end("complete", Reply(content="a")) for t in turns))

"""db/history_cache.py with begin_turn's p_cached: a process reads only the turns it has not seen,
and the history it sends is exactly what reading everything would give, whichever process
wrote which turn."""

import unittest
from typing import Optional

from tornado.testing import gen_test

from db import conversations
from db.conversations import ANONYMOUS, Reply
from db.history_cache import HistoryCache
from tests.support import ChatterdTestCase


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def cached_turns(cache: HistoryCache, app_id: str) -> Optional[list[int]]:
    """The turn ids the cache holds for the appID, as begin_turn is told them; None: none."""
    return list(cache.snapshot(ANONYMOUS, app_id)) or None


class AssembleTest(unittest.TestCase):
    def test_system_prompts_first_then_window_turns_in_order_from_fetch_or_cache(self) -> None:
        cache = HistoryCache(10)
        first = cache.assemble(ANONYMOUS, "a", cache.snapshot(ANONYMOUS, "a"), [msg("system", "S"), msg("user", "q1"), msg("assistant", "r1")],
                               [1, 1, 1], [1])
        self.assertEqual([m["content"] for m in first], ["S", "q1", "r1"])
        self.assertEqual(cached_turns(cache, "a"), [1])
        # Turn 1 cached, turn 2 fetched, turn 3 in the window but with nothing to send.
        second = cache.assemble(ANONYMOUS, "a", cache.snapshot(ANONYMOUS, "a"), [msg("system", "S"), msg("user", "q2"), msg("assistant", "r2")],
                                [1, 2, 2], [3, 2, 1])
        self.assertEqual([m["content"] for m in second], ["S", "q1", "r1", "q2", "r2"])
        self.assertEqual(sorted(cached_turns(cache, "a")), [1, 2, 3])
        # The window moved on: turn 1 left it, so the cache lets it go.
        cache.assemble(ANONYMOUS, "a", cache.snapshot(ANONYMOUS, "a"), [], [], [2, 3])
        self.assertEqual(sorted(cached_turns(cache, "a")), [2, 3])

    def test_least_recently_used_appids_are_let_go(self) -> None:
        cache = HistoryCache(2)
        for app in ("a", "b", "c"):
            cache.assemble(ANONYMOUS, app, cache.snapshot(ANONYMOUS, app), [msg("user", app)], [1], [1])
        self.assertIsNone(cached_turns(cache, "a"))
        self.assertEqual(cached_turns(cache, "c"), [1])
        cache.forget(ANONYMOUS, "c")
        self.assertIsNone(cached_turns(cache, "c"))

    def test_an_appid_evicted_or_forgotten_while_its_turn_begins_loses_nothing(self) -> None:
        # begin_turn told the database which turns it has (the snapshot); before the answer
        # came, other appIDs pushed this one out, or /llmprep forgot it.  The snapshot still
        # supplies the turns the database did not send.
        cache = HistoryCache(1)
        cache.assemble(ANONYMOUS, "x", {}, [msg("user", "q1"), msg("assistant", "r1")], [1, 1], [1])
        for lose in (lambda: cache.assemble(ANONYMOUS, "y", {}, [], [], []), lambda: cache.forget(ANONYMOUS, "x")):
            known = cache.snapshot(ANONYMOUS, "x") or {1: (msg("user", "q1"), msg("assistant", "r1"))}
            lose()
            history = cache.assemble(ANONYMOUS, "x", known, [msg("user", "q2"), msg("assistant", "r2")],
                                     [2, 2], [1, 2])
            self.assertEqual([m["content"] for m in history], ["q1", "r1", "q2", "r2"])

    def test_size_zero_keeps_nothing(self) -> None:
        cache = HistoryCache(0)
        history = cache.assemble(ANONYMOUS, "a", {}, [msg("user", "q")], [1], [1])
        self.assertEqual(history, [msg("user", "q")])
        self.assertIsNone(cached_turns(cache, "a"))


class TwoProcessesTest(ChatterdTestCase):
    async def turn(self, cache, app_id, messages, reply, status="complete"):  # type: ignore[no-untyped-def]
        turn_id, history, _, _ = await conversations.begin_turn(
            self.pool, ANONYMOUS, app_id, "test", 10, messages, budget=None, cache=cache)
        await conversations.end_turn(self.pool, ANONYMOUS, turn_id, status, None,
                                     Reply(content=reply))
        return history

    @gen_test(timeout=30)
    async def test_histories_match_reading_everything_whoever_wrote_each_turn(self) -> None:
        a, b = HistoryCache(10), HistoryCache(10)  # two processes
        expected: list[dict] = []
        script = [(a, [msg("system", "be brief"), msg("user", "q0")], "r0", "complete"),
                  (a, [msg("user", "q1")], "r1", "complete"),
                  # Ended before any answer text: outside the conversation, never sent.
                  (b, [msg("user", "q2")], "", "interrupted"),
                  (a, [msg("user", "q3")], "r3", "failed"),
                  (a, [msg("system", "lost"), msg("user", "q4")], "", "failed"),
                  (b, [msg("user", "q4")], "r4", "complete"),
                  (a, [msg("user", "q5")], "r5", "complete"),
                  (None, [msg("user", "q6")], "r6", "complete")]  # no cache at all
        for cache, messages, reply, status in script:
            history = await self.turn(cache, "two", messages, reply, status)
            self.assertEqual(history, expected)
            if status != "complete" and not reply:
                continue
            system = [m for m in expected + messages if m["role"] == "system"]
            rest = [m for m in expected + messages if m["role"] != "system"]
            expected = system + rest + ([msg("assistant", reply)] if reply else [])

    @gen_test(timeout=30)
    async def test_cached_turns_are_not_read_again(self) -> None:
        cache = HistoryCache(10)
        for i in range(4):
            await self.turn(cache, "once", [msg("user", f"q{i}")], f"r{i}")
        cached = cached_turns(cache, "once")
        self.assertEqual(len(cached), 3)
        async with self.pool.acquire() as con:
            row = await con.fetchrow(
                "SELECT history, history_turns, window_turns FROM begin_turn(0, 'once', 'test', 10,"
                " '[{\"role\": \"user\", \"content\": \"q4\"}]'::jsonb, p_cached => $1)", cached)
        self.assertEqual(len(row["window_turns"]), 4)
        self.assertEqual([m["content"] for m in row["history"]], ["q3", "r3"])  # only the new one
        self.assertEqual(set(row["history_turns"]) & set(cached), set())

    @gen_test(timeout=30)
    async def test_llmprep_forgets_the_appid(self) -> None:
        cache = HistoryCache(10)
        await self.turn(cache, "prep", [msg("user", "old")], "old reply")
        await self.turn(cache, "prep", [msg("user", "q")], "r")
        turn_id, history, _, _ = await conversations.begin_turn(
            self.pool, ANONYMOUS, "prep", "test", 10, [msg("system", "new")], replace=True,
            cache=cache)
        self.assertEqual(history, [])
        await conversations.end_turn(self.pool, ANONYMOUS, turn_id, "complete", None, None)
        history = await self.turn(cache, "prep", [msg("user", "q2")], "r2")
        self.assertEqual(history, [msg("system", "new")])

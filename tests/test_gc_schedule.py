"""runtime/gc_schedule.py and the unlinking it relies on: a finished turn is freed by reference
counting (no cyclic garbage left for a full collection), and full collections run on a
timer, not on heap growth."""

import asyncio
import gc

import asyncpg

from tornado.testing import AsyncTestCase, gen_test

import metrics
from runtime.gc_schedule import NEVER, FullCollections
from tests.support import ChatterdTestCase, chat_and_leave, chat_body, streams_finished
from tests.test_upstreams import UpstreamsTestCase

# What one request's object graph is made of: none of these may be left to the collector.
REQUEST_TYPES = {"LLMChatHandler", "ChatCompletionsHandler", "UpstreamCall", "OpenAICall",
                 "EventStream", "AbortableConnection", "BufferedChunkConnection",
                 "HTTP1Connection", "HTTP1ServerConnection", "IOStream", "HTTPServerRequest",
                 "HTTPRequest", "Turn", "ReplyText", "EarlyCall"}


class NoCyclicGarbageTest(ChatterdTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.double.behave("llama3.2", reply="one two three four five six", token_delay=0.005)
        self.double.behave("slow", reply="a b c d e f g h i j k l m n o p", token_delay=0.05)

    def tearDown(self) -> None:
        gc.set_debug(0)
        gc.garbage.clear()
        super().tearDown()

    def left_to_the_collector(self) -> dict:
        """Types of REQUEST_TYPES that only a cyclic collection would free, with counts."""
        gc.collect()
        found: dict = {}
        for o in gc.garbage:
            name = type(o).__name__
            if name in REQUEST_TYPES:
                found[name] = found.get(name, 0) + 1
        return found

    def test_complete_failed_and_abandoned_turns_are_freed_by_refcounting(self) -> None:
        self.post_json("/llmchat", chat_body("warm-up", "hi"))  # first-use objects aside
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
        for i in range(3):  # complete
            self.assertEqual(self.post_json("/llmchat", chat_body(f"gc-{i}", "hi")).code, 200)
        self.double.behave("broken", reply="x y z", reset_after=1)
        response = self.post_json("/llmchat", chat_body("gc-broken", "hi", model="broken"))
        self.assertIn(b"event: error", response.body)  # failed mid-stream
        response = self.post_json("/llmchat", chat_body("gc-404", "hi", model="nosuch"))
        self.assertEqual(response.code, 404)  # refused before the stream
        self.io_loop.run_sync(lambda: chat_and_leave(  # the client leaves mid-stream
            self.get_http_port(), chat_body("gc-left", "hi", model="slow")))
        self.io_loop.run_sync(lambda: streams_finished(self._app))
        left = [r for r in self.double.chat_requests() if r.body["model"] == "slow"][-1]
        self.io_loop.run_sync(lambda: asyncio.wait_for(left.closed.wait(), 5))  # Ollama told
        found = self.left_to_the_collector()
        self.assertEqual(found, {})


    def test_turns_sent_early_are_freed_by_refcounting_confirmed_or_cancelled(self) -> None:
        def early(outcome: str) -> float:
            return metrics.EARLY_UPSTREAM.labels(outcome=outcome)._value.get()

        async def edit_conversation() -> None:  # the last turn (not cached yet): q4 is stale
            con = await asyncpg.connect(self.dsn())
            try:
                await con.execute("UPDATE chatterd.messages SET content = 'edited'"
                                  " WHERE appid = 'gc-early' AND content = 'q3'")
            finally:
                await con.close()

        self.post_json("/llmchat", chat_body("gc-early", "q0"))
        self.post_json("/llmchat", chat_body("gc-early", "q1"))  # first-use objects aside
        confirmed, cancelled = early("confirmed"), early("cancelled")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        for i in range(2, 4):
            self.assertEqual(self.post_json("/llmchat", chat_body("gc-early", f"q{i}")).code, 200)
        self.io_loop.run_sync(edit_conversation)
        self.assertEqual(self.post_json("/llmchat", chat_body("gc-early", "q4")).code, 200)
        self.assertEqual(self.post_json("/llmchat", chat_body("gc-early", "q5", stream=False)).code, 200)
        self.io_loop.run_sync(lambda: streams_finished(self._app))
        self.assertEqual((early("confirmed") - confirmed, early("cancelled") - cancelled), (3, 1))
        self.assertEqual(self.left_to_the_collector(), {})


class FullCollectionsTest(AsyncTestCase):
    def tearDown(self) -> None:
        gc.set_debug(0)
        super().tearDown()

    @gen_test
    async def test_full_collections_run_on_the_timer_only(self) -> None:
        before = gc.get_threshold()
        schedule = FullCollections(0.05)
        try:
            self.assertEqual(gc.get_threshold()[2], NEVER)  # no heap-growth trigger
            self.assertGreater(gc.get_freeze_count(), 0)  # start-up objects frozen
            collected = asyncio.Event()
            gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2
                                and collected.set())
            await asyncio.wait_for(collected.wait(), 5)  # the timer's full collection
        finally:
            gc.callbacks.pop()
            schedule.stop()
        self.assertEqual(gc.get_threshold(), before)
        self.assertEqual(gc.get_freeze_count(), 0)


class RoutedNoCyclicGarbageTest(UpstreamsTestCase):
    """The same through the router (several upstreams, the OpenAI dialect)."""

    def tearDown(self) -> None:
        gc.set_debug(0)
        gc.garbage.clear()
        super().tearDown()

    def test_routed_turns_are_freed_by_refcounting_and_finish_cleanly(self) -> None:
        self.post_json("/llmchat", chat_body("warm-up", "hi", model="gpt-double"))
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        with self.assertNoLogs("tornado.application", "ERROR"):
            for model in ("gpt-double", "llama3.2"):  # OpenAI dialect, then Ollama
                response = self.post_json("/llmchat", chat_body(f"gc-r-{model}", "hi", model=model))
                self.assertEqual(response.code, 200)
                response = self.post_json("/llmchat", chat_body(f"gc-o-{model}", "hi", model=model,
                                                                 stream=False))
                self.assertEqual(response.code, 200)
            self.assertEqual(self.post_json("/v1/chat/completions", {
                "model": "gpt-double", "messages": [{"role": "user", "content": "hi"}],
                "stream": True}).code, 200)
        gc.collect()
        found = {type(o).__name__ for o in gc.garbage} & (REQUEST_TYPES | {"RoutedCall"})
        self.assertEqual(found, set())

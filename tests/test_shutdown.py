"""Graceful shutdown (Application.drain): running turns finish or end with an error event
and are stored; new turns are refused with 503 and store nothing."""

import asyncio

from tornado.testing import gen_test

import jsonfmt
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_body


class DrainTest(ChatterdTestCase):
    async def start_chat(self, app_id, model):
        """Start a turn; return (a future of its whole body, once its first event arrived)."""
        received, first_event = [], asyncio.Event()

        def on_chunk(chunk):
            received.append(chunk)
            if b"data: " in chunk:
                first_event.set()

        async def run():
            await self.http_client.fetch(
                self.get_url("/llmchat"), method="POST", request_timeout=30,
                body=jsonfmt.dumps(chat_body(app_id, "hi", model=model)), streaming_callback=on_chunk)
            return b"".join(received)

        turn = asyncio.ensure_future(run())
        await asyncio.wait_for(first_event.wait(), 10)
        return turn

    @gen_test(timeout=30)
    async def test_turns_within_the_grace_finish_normally(self):
        self.double.behave("slow", token_delay=0.05)
        turn = await self.start_chat("g1", "slow")
        await self._app.drain(grace=20)
        self.assertEqual(self._app.in_flight, set())  # drain returned only once all were done
        events, _ = parse(await turn)
        self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
        rows = await self.conversation("g1")
        self.assertEqual([(r["role"], r["status"]) for r in rows], [("user", "complete"),
                                                                    ("assistant", "complete")])

    @gen_test(timeout=30)
    async def test_turns_past_the_grace_end_with_error_and_are_stored(self):
        self.double.behave("endless", token_delay=0.05, stall_after=5)
        turn = await self.start_chat("g2", "endless")
        await self._app.drain(grace=0.2)
        events, _ = parse(await turn)
        self.assertEqual(events[-1].event, "error")
        self.assertIn("shutting down", jsonfmt.loads(events[-1].data)["error"])
        rows = await self.conversation("g2")
        self.assertEqual([r["role"] for r in rows], ["user", "assistant"])
        self.assertEqual(rows[1]["status"], "failed")
        self.assertTrue(rows[1]["content"])
        await asyncio.wait_for(self.double.chat_requests()[0].closed.wait(), 2)

    @gen_test(timeout=30)
    async def test_llmprompt_streams_are_drained_too(self):
        self.double.behave("endless", token_delay=0.05, stall_after=5)
        received, first_line = [], asyncio.Event()

        def on_chunk(chunk):
            received.append(chunk)
            first_line.set()

        prompt = asyncio.ensure_future(self.http_client.fetch(
            self.get_url("/llmprompt"), method="POST", request_timeout=30, streaming_callback=on_chunk,
            body=jsonfmt.dumps({"model": "endless", "prompt": "hi"})))
        await asyncio.wait_for(first_line.wait(), 10)
        await self._app.drain(grace=0.2)
        await prompt
        last = jsonfmt.loads(b"".join(received).rstrip(b"\n").split(b"\n")[-1])
        self.assertIn("shutting down", last["error"])

    @gen_test(timeout=30)
    async def test_a_turn_still_waiting_for_ollama_is_refused_with_503(self):
        # Nothing was sent yet, so the turn is undone and a proxy may retry it elsewhere.
        self.double.behave("cold", header_delay=10)
        turn = asyncio.ensure_future(self.http_client.fetch(
            self.get_url("/llmchat"), method="POST", raise_error=False, request_timeout=30,
            body=jsonfmt.dumps(chat_body("g4", "hi", model="cold"))))
        await self.double.wait_for_chats(1)  # the turn has reached Ollama
        await self._app.drain(grace=0)
        response = await turn
        self.assertEqual(response.code, 503)
        self.assertIn("shutting down", jsonfmt.loads(response.body)["error"])
        self.assertEqual(await self.conversation("g4"), [])

    @gen_test(timeout=30)
    async def test_new_turns_are_refused_while_draining(self):
        self._app.draining = True
        response = await self.http_client.fetch(
            self.get_url("/llmchat"), method="POST", raise_error=False,
            body=jsonfmt.dumps(chat_body("g3", "hi")))
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.get("Connection"), "close")
        self.assertIn("shutting down", jsonfmt.loads(response.body)["error"])
        self.assertEqual(await self.conversation("g3"), [])
        ready = await self.http_client.fetch(self.get_url("/readyz"), raise_error=False)
        self.assertEqual(ready.code, 503)

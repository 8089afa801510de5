"""/llmchat when things go wrong mid-way: client disconnects, upstream stalls, resets,
errors, slow model loads (heartbeats) and many conversations at once."""

import asyncio

from tornado.httpclient import AsyncHTTPClient
from tornado.testing import gen_test

import jsonfmt
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_and_leave, chat_body, streams_finished


class DisconnectTest(ChatterdTestCase):
    async def open_chat_and_leave(self, body):
        return await chat_and_leave(self.get_http_port(), body)

    @gen_test(timeout=20)
    async def test_disconnect_mid_stream_stops_upstream_and_keeps_partial(self):
        self.double.behave("slow", token_delay=0.1, reply="word " * 200)
        with self.assertNoLogs(level="ERROR"):  # a client leaving is not a crash
            await self.open_chat_and_leave(chat_body("dc", "hi", model="slow"))
            upstream = self.double.chat_requests()[0]
            await asyncio.wait_for(upstream.closed.wait(), 1.0)  # Ollama is told to stop at once
            await streams_finished(self._app)
        rows = await self.conversation("dc")
        self.assertEqual([r["role"] for r in rows], ["user", "assistant"])
        reply = rows[1]
        self.assertEqual(reply["status"], "interrupted")
        self.assertTrue(reply["content"])
        self.assertLess(upstream.chunks_sent, 100)  # of 200: generation stopped early

    @gen_test(timeout=20)
    async def test_disconnect_while_upstream_is_silent(self):
        self.double.behave("stall", stall_after=2)
        await self.open_chat_and_leave(chat_body("dc2", "hi", model="stall"))
        upstream = self.double.chat_requests()[0]
        await asyncio.wait_for(upstream.closed.wait(), 5)
        await streams_finished(self._app)
        rows = await self.conversation("dc2")
        self.assertEqual(rows[-1]["status"], "interrupted")


    @gen_test(timeout=20)
    async def test_leaving_a_non_streaming_request_stops_ollama_and_stores_nothing(self):
        self.double.behave("slow", token_delay=0.2)
        body = chat_body("dc3", "hi", model="slow", stream=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
        payload = jsonfmt.dumpb(body)
        writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        await writer.drain()
        await self.double.wait_for_chats(1)  # the turn has reached Ollama
        writer.transport.abort()
        await asyncio.wait_for(self.double.chat_requests()[0].closed.wait(), 5)
        await streams_finished(self._app)
        self.assertEqual(await self.conversation("dc3"), [])


class UpstreamFailureTest(ChatterdTestCase):
    settings_overrides = {"idle_timeout": 1.0}

    def run_chat(self, model, app_id="f"):
        response = self.post_json("/llmchat", chat_body(app_id, "hi", model=model), request_timeout=20)
        self.assertEqual(response.code, 200)
        events, _ = parse(response.body)
        self.assertEqual(events[-1].event, "error")
        self.assertTrue(all(e.event == "message" for e in events[:-1]))
        reply = self.rows(app_id)[-1]
        self.assertEqual((reply["role"], reply["status"]), ("assistant", "failed"))
        return jsonfmt.loads(events[-1].data)["error"], events, reply

    def test_mid_stream_error_line_becomes_error_event(self):
        self.double.behave("boom", error="an error was encountered while running the model: boom",
                           error_after=3)
        error, events, reply = self.run_chat("boom")
        self.assertIn("boom", error)
        self.assertEqual(len(events), 4)  # three tokens, then the error
        self.assertEqual(reply["content"], "".join(
            jsonfmt.loads(e.data)["message"]["content"] for e in events[:-1]))

    def test_stall_hits_the_idle_timeout(self):
        self.double.behave("stall", stall_after=2)
        error, _, reply = self.run_chat("stall")
        self.assertIn("sent nothing for 1 s", error)
        self.assertTrue(reply["content"])
        self.io_loop.run_sync(lambda: asyncio.wait_for(self.double.chat_requests()[0].closed.wait(), 5))

    def test_clean_close_mid_body(self):
        self.double.behave("close", close_after=2)
        error, _, _ = self.run_chat("close")
        self.assertIn("closed the connection", error)

    def test_end_without_done(self):
        self.double.behave("nodone", omit_done=True)
        error, _, _ = self.run_chat("nodone")
        self.assertIn("without its final done", error)


class ResetTest(ChatterdTestCase):
    # Neither this nor request_timeout (60 s) may end the turn.
    settings_overrides = {"idle_timeout": 30.0}
    run_chat = UpstreamFailureTest.run_chat

    def test_reset_mid_body_ends_promptly(self):
        self.double.behave("reset", reset_after=2)
        error, _, _ = self.run_chat("reset")
        self.assertIn("connection to Ollama failed", error)


class HeartbeatTest(ChatterdTestCase):
    settings_overrides = {"status_grace": 0.2, "heartbeat": 0.3}

    def test_slow_model_load_gets_heartbeats_then_data(self):
        self.double.behave("cold", header_delay=1.5)
        response = self.post_json("/llmchat", chat_body("hb", "hi", model="cold"), request_timeout=20)
        self.assertEqual(response.code, 200)
        body = response.body.decode()
        before_data = body[: body.index("data: ")]
        self.assertGreaterEqual(before_data.count(": keepalive\n\n"), 2)
        events, _ = parse(response.body)
        self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
        self.assertEqual(self.rows("hb")[-1]["status"], "complete")

    @gen_test(timeout=20)
    async def test_leaving_while_the_model_loads_stops_it(self):
        self.double.behave("cold", header_delay=5)
        await chat_and_leave(self.get_http_port(), chat_body("hb3", "hi", model="cold"),
                             wait_for=b": keepalive")
        await asyncio.wait_for(self.double.chat_requests()[0].closed.wait(), 5)
        await streams_finished(self._app)
        # Only heartbeats were sent, none of the answer: the turn never enters the conversation.
        self.assertEqual(await self.conversation("hb3"), [])
        self.assertEqual([t["status"] for t in await self.turns("hb3")], ["rejected"])
        # A rejected turn is not shown to the model on the next turn.
        self.double.behave("cold", header_delay=0)
        await self.http_client.fetch(self.get_url("/llmchat"), method="POST",
                                     body=jsonfmt.dumps(chat_body("hb3", "again", model="cold")))
        self.assertEqual(self.double.chat_requests()[1].body["messages"],
                         [{"role": "user", "content": "again"}])

    def test_late_error_status_arrives_as_error_event(self):
        self.double.behave("gone", header_delay=0.8, status=404, error="model 'gone' not found")
        response = self.post_json("/llmchat", chat_body("hb2", "hi", model="gone"), request_timeout=20)
        self.assertEqual(response.code, 200)
        events, comments = parse(response.body)
        self.assertIn("keepalive", comments)
        self.assertEqual([e.event for e in events], ["error"])
        self.assertIn("model 'gone' not found", jsonfmt.loads(events[0].data)["error"])


class ConcurrencyTest(ChatterdTestCase):
    def get_http_client(self):
        return AsyncHTTPClient(force_instance=True, max_clients=200)

    @gen_test(timeout=120)
    async def test_hundred_conversations_at_once(self):
        self.double.behave("llama3.2", token_delay=0.01)
        n = 100

        async def turn(i, text):
            response = await self.http_client.fetch(
                self.get_url("/llmchat"), method="POST", request_timeout=60,
                body=jsonfmt.dumps(chat_body(f"c{i}", text)))
            events, _ = parse(response.body)
            return "".join(jsonfmt.loads(e.data)["message"]["content"] for e in events)

        first = await asyncio.gather(*(turn(i, f"first {i}") for i in range(n)))
        second = await asyncio.gather(*(turn(i, f"second {i}") for i in range(n)))
        by_app = {}
        for request in self.double.chat_requests():
            messages = request.body["messages"]
            by_app.setdefault(messages[0]["content"].split()[1], []).append(messages)
        for i in range(n):
            turns = by_app[str(i)]
            self.assertEqual(turns[1], [{"role": "user", "content": f"first {i}"},
                                        {"role": "assistant", "content": first[i]},
                                        {"role": "user", "content": f"second {i}"}])
        self.assertEqual(len(set(first)), n)
        self.assertTrue(all(second))

    @gen_test(timeout=60)
    async def test_streams_do_not_queue_behind_each_other(self):
        # Tornado's client runs 10 requests at a time unless told otherwise; 50 stalled
        # streams must all be streaming at once.
        self.double.behave("stall", stall_after=1)
        n = 50
        streaming, all_streaming, release = [], asyncio.Event(), asyncio.Event()

        async def client(i):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
            payload = jsonfmt.dumpb(chat_body(f"q{i}", "hi", model="stall"))
            writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(payload), payload))
            seen = b""
            while b"data: " not in seen:
                data = await reader.read(4096)
                assert data, f"connection closed before the first event: {seen!r}"
                seen += data
            streaming.append(i)
            if len(streaming) == n:
                all_streaming.set()
            await release.wait()
            writer.transport.abort()

        clients = asyncio.gather(*(client(i) for i in range(n)))
        try:
            await asyncio.wait_for(all_streaming.wait(), 30)
        finally:
            release.set()
            await clients
        requests = self.double.chat_requests()
        self.assertEqual(len(requests), n)
        await asyncio.wait_for(asyncio.gather(*(r.closed.wait() for r in requests)), 10)
        await streams_finished(self._app)

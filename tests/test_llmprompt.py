"""POST /llmprompt: Ollama's /api/generate NDJSON passed through verbatim, nothing stored."""

import asyncio
import time

from tornado.testing import gen_test

import jsonfmt
from tests.support import ChatterdTestCase, chat_and_leave


class LLMPromptTest(ChatterdTestCase):
    def test_ndjson_passes_through(self):
        body = {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": True}
        response = self.post_json("/llmprompt", body)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Content-Type"], "application/x-ndjson")
        lines = response.body.split(b"\n")
        self.assertEqual(lines[-1], b"")
        chunks = [jsonfmt.loads(line) for line in lines[:-1]]
        self.assertTrue(chunks[-1]["done"])
        self.assertTrue("".join(c["response"] for c in chunks[:-1]))
        self.assertEqual(self.double.requests[-1].path, "/api/generate")
        self.assertEqual(self.double.requests[-1].body, body)  # forwarded untouched

    def test_lines_are_flushed_as_they_come(self):
        self.double.behave("slow", token_delay=0.2)
        arrivals = []
        self.post_json("/llmprompt", {"model": "slow", "prompt": "hi"},
                       streaming_callback=lambda c: arrivals.append(time.monotonic()))
        self.assertLess(arrivals[0], self.double.requests[-1].finished_at - 0.2)

    def test_each_line_leaves_without_waiting_for_the_previous_ack(self):
        import socket
        import sse
        self.double.behave("slow", token_delay=0.01)
        nagle_off = []
        original = sse.flush_within

        async def spy(handler, timeout):  # type: ignore[no-untyped-def]
            stream = handler.request.connection.stream
            nagle_off.append(stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            return await original(handler, timeout)

        sse.flush_within = spy
        try:
            response = self.post_json("/llmprompt", {"model": "slow", "prompt": "hi"})
        finally:
            sse.flush_within = original
        self.assertEqual(response.code, 200)
        self.assertGreater(len(nagle_off), 3)
        self.assertTrue(all(nagle_off), nagle_off)  # TCP_NODELAY for every line

    def test_errors(self):
        response = self.post_json("/llmprompt", {"model": "nope", "prompt": "hi"})
        self.assertEqual(response.code, 404)
        self.assertIn("model 'nope' not found", jsonfmt.loads(response.body)["error"])
        self.assertEqual(self.post_json("/llmprompt", b"[]").code, 400)

    def test_mid_stream_failure_is_an_ndjson_error_line(self):
        self.double.behave("close", close_after=2)
        response = self.post_json("/llmprompt", {"model": "close", "prompt": "hi"})
        last = jsonfmt.loads(response.body.split(b"\n")[-2])
        self.assertIn("closed the connection", last["error"])

    @gen_test(timeout=20)
    async def test_client_leaving_stops_generation(self):
        self.double.behave("slow", token_delay=0.1)
        await chat_and_leave(self.get_http_port(), {"model": "slow", "prompt": "hi"},
                             wait_for=b'"response"', path=b"/llmprompt")
        await asyncio.wait_for(self.double.requests[-1].closed.wait(), 5)

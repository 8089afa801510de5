"""The Ollama client on its own: line splitting, URLs, status, abort, reset and timeouts."""

import asyncio
import time

from tornado.testing import AsyncTestCase, gen_test

import jsonfmt
from ollama_client import (LineSplitter, OllamaAborted, OllamaBroken, OllamaClient, OllamaHTTPError,
                           OllamaTimeout, api_base)
from tests.ollama_double import OllamaDouble, default_reply


def test_line_splitter_ignores_chunk_boundaries():
    text = b'{"a":1}\n{"b":2}\r\n\n{"c":"x\\ny"}\n{"d":'
    for size in (1, 2, 3, 7, len(text)):
        splitter, lines = LineSplitter(), []
        for i in range(0, len(text), size):
            lines += splitter.feed(text[i:i + size])
        assert lines == [b'{"a":1}', b'{"b":2}', b'{"c":"x\\ny"}']
        assert splitter.rest() == [b'{"d":']


def test_line_splitter_escapes_what_would_end_a_line_early():
    ls = "\u2028".encode()
    text = (b'{"a":"x\ry"}\r\n{"b":"' + ls + b'"}\n{"c":"ok \xe2\x80\x99"}\n'
            b'{"d":"nul\x00"}\n{"e":1,\r"f":"\t"}\nnot json\r\x01\n{"g":"\ry')
    for size in (1, 2, 3, 7, len(text)):
        splitter, lines = LineSplitter(), []
        for i in range(0, len(text), size):
            lines += splitter.feed(text[i:i + size])
        assert lines == [b'{"a":"x\\ry"}', b'{"b":"\\u2028"}', b'{"c":"ok \xe2\x80\x99"}',
                         b'{"d":"nul\\u0000"}', b'{"e":1,"f":"\\t"}', b"not json\\u000d\\u0001"]
        assert splitter.rest() == [b'{"g":"\\u000dy']


def test_api_base_accepts_the_course_spelling():
    for url in ("http://localhost:11434", "http://localhost:11434/", "http://localhost:11434/api",
                "http://localhost:11434/api/"):
        assert api_base(url) == "http://localhost:11434"


class OllamaClientTest(AsyncTestCase):
    def setUp(self):
        super().setUp()
        self.double = OllamaDouble()
        self.double.listen()
        self.clients = []

    def tearDown(self):
        self.io_loop.run_sync(self.double.stop)
        for client in self.clients:
            client.close()
        super().tearDown()

    def client(self, **kwargs):
        self.clients.append(OllamaClient(self.double.url + "/api", **kwargs))
        return self.clients[-1]

    @gen_test
    async def test_lines_arrive_whole_and_in_order(self):
        got = []

        async def on_lines(lines):
            got.extend(lines)

        body = jsonfmt.dumpb({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
        call = self.client().post("/api/chat", body, on_lines)
        self.assertEqual(await call.wait_status(5), 200)
        await call.finished()
        chunks = [jsonfmt.loads(line) for line in got]
        self.assertEqual("".join(c["message"]["content"] for c in chunks),
                         default_reply([{"role": "user", "content": "x"}]))
        self.assertTrue(chunks[-1]["done"])

    @gen_test
    async def test_http_error_carries_status_and_message(self):
        call = self.client().post("/api/chat", b'{"model":"nope","messages":[]}', None)
        with self.assertRaises(OllamaHTTPError) as caught:
            await call.finished()
        self.assertEqual(caught.exception.status, 404)
        self.assertIn("model 'nope' not found", caught.exception.message)

    @gen_test
    async def test_abort_closes_a_stalled_upstream_at_once(self):
        self.double.behave("stall", stall_after=1)
        first_line = asyncio.Event()

        async def on_lines(lines):
            first_line.set()

        call = self.client().post("/api/chat", b'{"model":"stall","messages":[]}', on_lines)
        await asyncio.wait_for(first_line.wait(), 5)
        call.abort(OllamaAborted("client disconnected"))
        with self.assertRaises(OllamaAborted):
            await call.finished()
        await asyncio.wait_for(self.double.chat_requests()[0].closed.wait(), 5)

    @gen_test(timeout=20)
    async def test_reset_fails_fast_instead_of_hanging(self):
        self.double.behave("reset", reset_after=1)

        async def on_lines(lines):
            pass

        started = time.monotonic()
        call = self.client(request_timeout=60).post("/api/chat", b'{"model":"reset","messages":[]}',
                                                    on_lines)
        with self.assertRaises(OllamaBroken):
            await call.finished()
        self.assertLess(time.monotonic() - started, 10)  # generous: the bug waits 60 s

    @gen_test
    async def test_idle_timeout(self):
        self.double.behave("stall", stall_after=0, header_delay=0)

        async def on_lines(lines):
            pass

        call = self.client(idle_timeout=0.5).post("/api/chat", b'{"model":"stall","messages":[]}',
                                                  on_lines)
        with self.assertRaises(OllamaTimeout) as caught:
            await call.finished()
        self.assertIn("sent nothing for 0.5 s", caught.exception.message)

    @gen_test
    async def test_version(self):
        self.assertTrue(await self.client().version())

"""The Ollama client on its own: line splitting, URLs, status, abort, reset and timeouts."""

import asyncio
import time

from tornado.testing import AsyncTestCase, gen_test

import jsonfmt
import settings
from upstreams.client import UpstreamClient, api_base
from upstreams.errors import UpstreamAborted, UpstreamBroken, UpstreamBusy, UpstreamHTTPError, UpstreamTimeout
from tests.ollama_double import OllamaDouble, default_reply
from upstreams.lines import LineSplitter


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


class UpstreamClientTest(AsyncTestCase):
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
        self.clients.append(UpstreamClient(self.double.url + "/api", settings.defaults(**kwargs)))
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
        with self.assertRaises(UpstreamHTTPError) as caught:
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
        call.abort(UpstreamAborted("client disconnected"))
        with self.assertRaises(UpstreamAborted):
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
        with self.assertRaises(UpstreamBroken):
            await call.finished()
        self.assertLess(time.monotonic() - started, 10)  # generous: the bug waits 60 s

    def count_direct_reads(self) -> list:
        """Count the recvs UpstreamStream makes itself for a trickling body (read_trickle)."""
        import upstreams.stream
        calls = [0]
        original = upstreams.stream.UpstreamStream._read_direct

        def counted(stream):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return original(stream)

        upstreams.stream.UpstreamStream._read_direct = counted
        self.addCleanup(setattr, upstreams.stream.UpstreamStream, "_read_direct", original)
        return calls

    async def trickle_then(self, **behaviour) -> tuple[Exception, list, float]:
        """A body a token per 20 ms (read by read_trickle), then what *behaviour* says."""
        self.double.behave("trickle", token_delay=0.02, reply="w " * 12, **behaviour)
        direct = self.count_direct_reads()
        got = []

        async def on_lines(lines):
            got.extend(lines)

        started = time.monotonic()
        call = self.client(request_timeout=60, idle_timeout=60).post(
            "/api/chat", b'{"model":"trickle","messages":[]}', on_lines)
        with self.assertRaises(Exception) as caught:
            await call.finished()
        self.assertGreaterEqual(direct[0], 3)  # the failure met a read of read_trickle's
        return caught.exception, got, time.monotonic() - started

    @gen_test(timeout=20)
    async def test_reset_while_the_body_trickles_fails_fast(self):
        error, got, took = await self.trickle_then(reset_after=6)
        self.assertIsInstance(error, UpstreamBroken)
        self.assertIn("Connection reset by peer", error.message)  # the real cause, kept
        self.assertEqual(len(got), 6)  # every line before the reset, none lost
        self.assertLess(took, 10)  # not request_timeout's 60 s

    @gen_test(timeout=20)
    async def test_close_while_the_body_trickles_is_an_error(self):
        error, got, took = await self.trickle_then(close_after=6)
        self.assertIsInstance(error, UpstreamBroken)
        self.assertEqual(len(got), 6)
        self.assertLess(took, 10)

    @gen_test(timeout=20)
    async def test_abort_while_the_body_trickles(self):
        self.double.behave("trickle", token_delay=0.02, reply="w " * 200)
        direct = self.count_direct_reads()
        lines_seen = asyncio.Event()
        call = None

        async def on_lines(lines):
            if direct[0] >= 3:
                lines_seen.set()

        call = self.client().post("/api/chat", b'{"model":"trickle","messages":[]}', on_lines)
        await asyncio.wait_for(lines_seen.wait(), 5)
        call.abort(UpstreamAborted("client disconnected"))  # while a direct read waits
        with self.assertRaises(UpstreamAborted):
            await call.finished()
        await asyncio.wait_for(self.double.chat_requests()[0].closed.wait(), 5)

    @gen_test(timeout=20)
    async def test_a_slow_reader_of_a_trickling_body_loses_nothing(self):
        # While a delivery waits (a slow client), tokens arriving are read the usual way
        # into IOStream's buffer; the next read takes them from there, in order.
        reply = "".join(f"t{i} " for i in range(60))
        self.double.behave("trickle", token_delay=0.005, reply=reply)
        direct = self.count_direct_reads()
        got = []

        async def on_lines(lines):
            got.extend(lines)
            if len(got) % 7 == 0:
                await asyncio.sleep(0.03)  # several tokens arrive meanwhile

        call = self.client().post("/api/chat", b'{"model":"trickle","messages":[]}', on_lines)
        await call.finished()
        chunks = [jsonfmt.loads(line) for line in got]
        self.assertEqual("".join(c["message"]["content"] for c in chunks), reply)
        self.assertTrue(chunks[-1]["done"])
        self.assertGreater(direct[0], 5)

    @gen_test
    async def test_idle_timeout(self):
        self.double.behave("stall", stall_after=0, header_delay=0)

        async def on_lines(lines):
            pass

        call = self.client(idle_timeout=0.5).post("/api/chat", b'{"model":"stall","messages":[]}',
                                                  on_lines)
        with self.assertRaises(UpstreamTimeout) as caught:
            await call.finished()
        self.assertIn("sent nothing for 0.5 s", caught.exception.message)

    @gen_test
    async def test_the_whole_request_is_limited_though_tokens_keep_coming(self):
        # Never idle (a token every 50 ms), but longer than request_timeout: the call's own
        # timer ends it, with no Tornado timer armed for it (runtime/coarse_timers.py).
        self.double.behave("drip", reply="word " * 100, token_delay=0.05)
        got = []

        async def on_lines(lines):
            got.extend(lines)

        client = self.client(idle_timeout=5, request_timeout=0.6)
        started = time.monotonic()
        call = client.post("/api/chat", b'{"model":"drip","messages":[]}', on_lines)
        self.assertEqual(call._request.request_timeout, 0)
        with self.assertRaises(UpstreamTimeout) as caught:
            await call.finished()
        self.assertIn("request exceeded 0.6 s", caught.exception.message)
        self.assertGreaterEqual(time.monotonic() - started, 0.6)
        self.assertGreater(len(got), 3)  # it was streaming, not stuck
        self.assertFalse(jsonfmt.loads(got[-1])["done"])
        await asyncio.wait_for(self.double.chat_requests()[0].closed.wait(), 5)

    @gen_test
    async def test_the_limit_counts_from_the_slot_not_the_queue(self):
        # A call that waited for a slot (--max-streams) gets its whole request_timeout after.
        self.double.behave("slow", reply="ab", token_delay=0.3)
        client = self.client(request_timeout=0.8, max_streams=1, queue_timeout=5)

        async def on_lines(lines):
            pass

        first = client.post("/api/chat", b'{"model":"slow","messages":[]}', on_lines)
        second = client.post("/api/chat", b'{"model":"slow","messages":[]}', on_lines)
        await first.finished()  # ~0.6 s: the second waited that long for its slot
        await second.finished()  # another ~0.6 s, within its own 0.8

    @gen_test
    async def test_version(self):
        self.assertTrue(await self.client().version())


class QueueTest(AsyncTestCase):
    """--max-streams slots: a request past them waits --queue-timeout, then fails with 503."""

    def setUp(self):
        super().setUp()
        self.double = OllamaDouble()
        self.double.listen()
        self.double.behave("slow", token_delay=0.2, reply="word " * 20)

    def tearDown(self):
        self.io_loop.run_sync(self.double.stop)
        super().tearDown()

    async def three_slow_streams(self, client):
        async def on_lines(lines):
            pass

        return [client.post("/api/chat", b'{"model":"slow","messages":[]}', on_lines) for _ in range(3)]

    @gen_test(timeout=20)
    async def test_a_request_past_the_slots_fails_with_503_after_the_queue_timeout(self):
        client = UpstreamClient(self.double.url,
                                settings.defaults(max_streams=2, queue_timeout=0.5, connect_timeout=0.2))
        try:
            started = time.monotonic()
            first, second, third = await self.three_slow_streams(client)
            with self.assertRaises(UpstreamBusy) as caught:
                await third.finished()
            self.assertAlmostEqual(time.monotonic() - started, 0.5, delta=0.3)
            self.assertEqual(caught.exception.status, 503)
            self.assertEqual(caught.exception.message, "all 2 upstream slots are busy; retry later")
            await first.finished()  # the two in their slots are unaffected
            await second.finished()
            self.assertEqual(len(self.double.chat_requests()), 2)  # the third never reached Ollama
            self.assertEqual((client.slots.busy, len(client.slots.waiting)), (0, 0))
        finally:
            client.close()

    @gen_test(timeout=20)
    async def test_a_queued_request_runs_when_a_slot_frees(self):
        client = UpstreamClient(self.double.url,
                                settings.defaults(max_streams=2, queue_timeout=10, connect_timeout=0.2))
        try:
            first, second, third = await self.three_slow_streams(client)
            await asyncio.wait_for(self.double.wait_for_chats(2), 5)
            first.abort(UpstreamAborted("client disconnected"))
            await third.finished()
            self.assertEqual(len(self.double.chat_requests()), 3)
            await second.finished()
            self.assertEqual((client.slots.busy, len(client.slots.waiting)), (0, 0))
        finally:
            client.close()

    @gen_test(timeout=20)
    async def test_a_queued_request_can_be_aborted(self):
        client = UpstreamClient(self.double.url,
                                settings.defaults(max_streams=2, queue_timeout=10))
        try:
            first, second, third = await self.three_slow_streams(client)
            started = time.monotonic()
            third.abort(UpstreamAborted("client disconnected"))
            with self.assertRaises(UpstreamAborted):
                await third.finished()
            self.assertLess(time.monotonic() - started, 1)
            await first.finished()
            await second.finished()
            self.assertEqual((client.slots.busy, len(client.slots.waiting)), (0, 0))
        finally:
            client.close()

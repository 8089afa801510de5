"""runtime/direct_write.py: an SSE body written straight to the client's IOStream, framed as Tornado
would frame it (chunked for HTTP/1.1, raw for HTTP/1.0), and awaited only when the client
is behind."""

import asyncio
import socket

from tornado.iostream import IOStream, StreamClosedError
from tornado.testing import AsyncHTTPTestCase, AsyncTestCase, gen_test
from tornado.web import Application, RequestHandler

import jsonfmt
from runtime.direct_write import DirectWriter
from sse import KEEPALIVE, EventStream
from tests import sse_parser
from tests.support import ChatterdTestCase, chat_body


async def raw_exchange(port: int, request_line: bytes, body: dict) -> tuple[bytes, bytes]:
    """Send one POST on a raw socket and read until the server closes; (head, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = jsonfmt.dumpb(body)
    writer.write(request_line + b"\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return head, rest


def dechunk(body: bytes) -> list[bytes]:
    """The chunks of a chunked body, strictly: every size line, CRLF and the last chunk."""
    chunks = []
    while True:
        size_line, sep, body = body.partition(b"\r\n")
        assert sep, f"no chunk size line in {body[:60]!r}"
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", f"bytes after the last chunk: {body!r}"
            return chunks
        chunks.append(body[:size])
        assert body[size:size + 2] == b"\r\n", "chunk not terminated by CRLF"
        body = body[size + 2:]


class DirectWriteTest(ChatterdTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.double.behave("llama3.2", reply="one two three four five six", token_delay=0.01)

    @gen_test
    async def test_http11_body_is_well_formed_chunks_of_whole_events(self) -> None:
        writes = []
        original = DirectWriter.write

        def counted(writer, data):  # type: ignore[no-untyped-def]
            writes.append(data)
            nagle_off.append(writer.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            return original(writer, data)

        nagle_off = []

        DirectWriter.write = counted  # type: ignore[method-assign]
        try:
            head, body = await raw_exchange(self.get_http_port(), b"POST /llmchat HTTP/1.1",
                                            chat_body("dw-11", "hi"))
        finally:
            DirectWriter.write = original  # type: ignore[method-assign]
        self.assertGreater(len(writes), 3)  # the events after the first went the direct way
        # Each event leaves at once, not held by the kernel until the previous one is ACKed.
        self.assertTrue(all(nagle_off), nagle_off)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        chunks = dechunk(body)
        self.assertGreater(len(chunks), 3)  # one chunk per upstream write, not one in all
        for chunk in chunks:
            self.assertTrue(chunk.endswith(b"\n\n"), f"a chunk splits an event: {chunk!r}")
        events, _ = sse_parser.parse(b"".join(chunks))
        lines = [jsonfmt.loads(e.data) for e in events]
        self.assertEqual("".join(x["message"]["content"] for x in lines),
                         "one two three four five six")
        self.assertTrue(lines[-1]["done"])
        rows = await self.conversation("dw-11")
        self.assertEqual([r["content"] for r in rows], ["hi", "one two three four five six"])

    @gen_test
    async def test_http10_body_is_raw_events_until_close(self) -> None:
        head, body = await raw_exchange(self.get_http_port(), b"POST /llmchat HTTP/1.0",
                                        chat_body("dw-10", "hi"))
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertNotIn(b"\r\n0\r\n", body)
        events, _ = sse_parser.parse(body)  # no chunk size lines in between
        lines = [jsonfmt.loads(e.data) for e in events]
        self.assertEqual("".join(x["message"]["content"] for x in lines),
                         "one two three four five six")
        self.assertTrue(lines[-1]["done"])


class DirectWriterTest(AsyncTestCase):
    """The writer itself, on a real socket pair."""

    @gen_test
    async def test_done_at_once_when_the_kernel_takes_it_pending_when_the_peer_lags(self) -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        stream = IOStream(ours)
        writer = DirectWriter(stream, chunked=True)
        self.assertIsNone(writer.write(b"data: x\n\n"))  # the usual case: nothing to await
        self.assertEqual(theirs.recv(100), b"9\r\ndata: x\n\n\r\n")
        block = b"y" * 65536
        sent = 0
        future = None
        while future is None:  # fill the socket buffers until the kernel stops taking bytes
            future = writer.write(block)
            sent += len(block) + 9  # (its chunk framing)
        self.assertFalse(future.done())
        # The peer takes some (the kernel has room again) before the loop lets IOStream
        # write what it holds: the next write must still queue behind that.
        received = bytearray(theirs.recv(1 << 20))
        last = writer.write(b"the end")  # queued behind the rest, never sent ahead of it
        self.assertIsNotNone(last)
        sent += 12
        loop = asyncio.get_running_loop()
        while len(received) < sent:  # the peer reads (each recv waits for data)
            received += await loop.sock_recv(theirs, 1 << 20)
        await future
        await last
        self.assertEqual(len(received), sent)
        self.assertTrue(received.endswith(b"7\r\nthe end\r\n"))
        self.assertEqual(received.count(b"10000\r\n" + block + b"\r\n"), (sent - 12) // (65536 + 9))
        theirs.close()
        with self.assertRaises(StreamClosedError):
            for _ in range(100):  # the close is noticed at the next write that fails
                pending = writer.write(block)
                if pending is not None:
                    await pending
        stream.close()

    @gen_test
    async def test_a_write_the_client_does_not_take_in_time_fails_as_a_timeout(self) -> None:
        from types import SimpleNamespace
        from sse import bounded
        ours, theirs = socket.socketpair()
        stream = IOStream(ours)
        writer = DirectWriter(stream, chunked=True)
        future = None
        while future is None:  # the peer never reads: the kernel's buffers fill
            future = writer.write(b"z" * 65536)
        handler = SimpleNamespace(request=SimpleNamespace(connection=SimpleNamespace(stream=stream)))
        with self.assertRaises(StreamClosedError) as caught:
            await bounded(handler, future, 0.2)  # type: ignore[arg-type]
        self.assertIsInstance(caught.exception.real_error, TimeoutError)
        self.assertTrue(stream.closed())
        theirs.close()

    def test_a_tls_stream_is_written_through_its_iostream(self) -> None:
        import ssl
        from tornado.iostream import SSLIOStream
        ours, theirs = socket.socketpair()
        stream = SSLIOStream(ours, ssl_options=ssl.create_default_context())
        self.assertIsNone(DirectWriter(stream, chunked=True).socket)  # never sent around SSL
        stream.close()
        theirs.close()

    @gen_test
    async def test_raw_framing_for_http10(self) -> None:
        ours, theirs = socket.socketpair()
        stream = IOStream(ours)
        self.assertIsNone(DirectWriter(stream, chunked=False).write(b"data: x\n\n"))
        self.assertEqual(theirs.recv(100), b"data: x\n\n")
        stream.close()
        theirs.close()


class ClosedStreamTest(AsyncHTTPTestCase):
    """A write that waited for the stream's last one (a heartbeat) writes nothing once the
    stream is closed: after finish() it would land behind the chunked body's end."""

    def get_app(self) -> Application:
        class Probe(RequestHandler):
            async def get(self) -> None:
                events = EventStream(self, 15.0, 30.0)
                events.set_headers()
                await events.open(b"data: first\n\n")
                await events.send(b"data: second\n\n")
                events.close()
                await events.send(KEEPALIVE)

        return Application([("/", Probe)])

    def test_nothing_is_written_after_close(self) -> None:
        response = self.fetch("/")
        self.assertEqual(response.body, b"data: first\n\ndata: second\n\n")


class LaggingClientTest(AsyncHTTPTestCase):
    """Once the headers are out, EventStream.send_now writes at once, behind what is queued;
    what it returns only waits.  So an awaitable that is never awaited (the relay's reader
    failed as it was handed one) loses no bytes and leaves no write pending for ever."""

    def get_app(self) -> Application:
        self.blocked = asyncio.Event()
        self.outcome: dict = {}
        test = self

        class Probe(RequestHandler):
            async def get(self) -> None:
                events = EventStream(self, 15.0, 30.0)
                events.set_headers()
                await events.open(b": open\n\n")
                pad = b"p" * 4000
                pending, i = None, 0
                while pending is None:  # the client does not read: the kernel's buffers fill
                    pending = events.send_now(b"data: %d %s\n\n" % (i, pad))
                    i += 1
                second = events.send_now(b"data: behind\n\n")  # while the first is queued
                test.outcome["second"] = second is not None
                for awaitable in (pending, second):
                    awaitable.close()  # never awaited
                test.outcome["sent"] = i
                test.blocked.set()
                await asyncio.wait_for(events.send(b"data: last\n\n"), 10)
                test.outcome["last"] = True
                events.close()

        return Application([("/", Probe)])

    @gen_test(timeout=30)
    async def test_an_awaitable_never_awaited_loses_nothing(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(self.blocked.wait(), 10)
        raw = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        events = b"".join(dechunk(body)).split(b"\n\n")
        self.assertTrue(self.outcome["second"])
        self.assertTrue(self.outcome["last"])
        n = self.outcome["sent"]
        self.assertEqual(events[0], b": open")
        self.assertEqual([e.split(b" ")[1] for e in events[1:n + 1]],
                         [b"%d" % i for i in range(n)])
        self.assertEqual(events[n + 1:], [b"data: behind", b"data: last", b""])

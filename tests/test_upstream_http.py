"""upstreams/http.py: each change to Tornado's HTTP client, against a raw socket server
that writes exactly the bytes a test gives it, split where the test says."""

import asyncio
import contextlib
import random
import socket
from typing import Any, Callable, Iterator

from tornado.httpclient import HTTPRequest
from tornado.netutil import DefaultLoopResolver
from tornado.testing import AsyncTestCase, gen_test

import settings
import upstreams.http
from upstreams.http import CachingResolver, http_client


def chunked(pieces: list[bytes], extension: bytes = b"") -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces)
    return body + b"0\r\n\r\n"


@contextlib.contextmanager
def on_each_connection(record: Callable[[Any, Any], None]) -> Iterator[None]:
    """Call record(stream, made) for each upstream connection made meanwhile (made: its
    BufferedChunkConnection)."""
    original = upstreams.http.AbortableConnection._create_connection

    def spy(connection, stream):  # type: ignore[no-untyped-def]
        made = original(connection, stream)
        record(stream, made)
        return made

    upstreams.http.AbortableConnection._create_connection = spy
    try:
        yield
    finally:
        upstreams.http.AbortableConnection._create_connection = original


class RawServer:
    """Answers one request with `head + body`, written in the given slices, pausing between."""

    def __init__(self, body: bytes, cuts: list[int], pause: float = 0.001) -> None:
        self.head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.body, self.cuts, self.pause = body, cuts, pause

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.head)
        last = 0
        for cut in self.cuts + [len(self.body)]:
            writer.write(self.body[last:cut])
            await writer.drain()
            await asyncio.sleep(self.pause)  # separate reads on the client
            last = cut
        writer.close()

    def close(self) -> None:
        self.server.close()


class BufferedChunkTest(AsyncTestCase):
    async def fetch(self, body: bytes, cuts: list[int],
                    pause: float = 0.001) -> tuple[bytes, list[bytes], object]:
        server = RawServer(body, cuts, pause)
        port = await server.start()
        received: list[bytes] = []
        client = http_client(10)
        try:
            response = await client.fetch(HTTPRequest(f"http://127.0.0.1:{port}/",
                                                      streaming_callback=received.append,
                                                      request_timeout=10), raise_error=False)
        except Exception as e:  # a broken body is an exception, not a status
            response = e
        finally:
            client.close()
            server.close()
        return b"".join(received), received, response

    @gen_test(timeout=30)
    async def test_any_split_of_the_stream_gives_the_same_body(self):
        rng = random.Random(7)
        pieces = [(b'{"n":%d}\n' % i) * rng.randint(1, 3) for i in range(40)]
        body = chunked(pieces)
        for cuts in ([], list(range(1, len(body))),  # everything at once; one byte at a time
                     sorted(rng.sample(range(1, len(body)), 30))):
            data, _, response = await self.fetch(body, cuts)
            self.assertEqual(response.code, 200)
            self.assertEqual(data, b"".join(pieces))

    @gen_test(timeout=10)
    async def test_chunks_already_received_are_handed_over_together(self):
        pieces = [b"a\n", b"b\n", b"c\n", b"d\n"]
        _, received, _ = await self.fetch(chunked(pieces), [])
        self.assertEqual(received, [b"a\nb\nc\nd\n"])  # one callback, not four

    @gen_test(timeout=10)
    async def test_reads_grow_for_a_burst(self):
        # Reads start at 4 KiB (a token at a time needs no more) and double while they come
        # back full: a 1 MiB burst arrives in a few dozen reads, not 256 of 4 KiB.
        pieces = [b"%06d" % i + b"x" * 1017 + b"\n" for i in range(1024)]
        data, received, response = await self.fetch(chunked(pieces), [])
        self.assertEqual((response.code, data), (200, b"".join(pieces)))
        self.assertLess(len(received), 64)

    @gen_test(timeout=20)
    async def test_a_trickling_body_costs_one_recv_per_piece(self):
        # Tornado tries a read at once whenever one is asked for, which for a body that
        # trickles in fails with EAGAIN every time, then reads through its buffer;
        # UpstreamStream.read_trickle waits for the socket and takes each piece with one recv.
        import upstreams.stream
        calls = {"iostream": 0, "direct": 0}
        stream_class = upstreams.stream.UpstreamStream
        originals = stream_class.read_from_fd, stream_class._read_direct

        def via_iostream(stream, buf):  # type: ignore[no-untyped-def]
            calls["iostream"] += 1
            return originals[0](stream, buf)

        def direct(stream):  # type: ignore[no-untyped-def]
            calls["direct"] += 1
            return originals[1](stream)

        pieces = [b'{"n":%d}\n' % i for i in range(40)]
        body = chunked(pieces)
        cuts = []
        at = 0
        for piece in pieces:  # one write per chunk, as an LLM server writes tokens
            at += len(b"%x\r\n" % len(piece)) + len(piece) + 2
            cuts.append(at)
        stream_class.read_from_fd, stream_class._read_direct = via_iostream, direct
        try:  # a token every 5 ms (a fast model); upstreams.http._TRICKLE_GAP is 2 ms
            data, _, response = await self.fetch(body, cuts, pause=0.005)
        finally:
            stream_class.read_from_fd, stream_class._read_direct = originals
        self.assertEqual((response.code, data), (200, b"".join(pieces)))
        self.assertLess(calls["iostream"] + calls["direct"], 1.5 * len(pieces))  # ~2 per piece before
        self.assertGreater(calls["direct"], len(pieces) // 2)  # read_trickle took most pieces

    @gen_test(timeout=20)
    async def test_small_writes_back_to_back_are_read_in_batches(self):
        # A producer writing one small chunk after another without pause is a burst, not a
        # trickle: IOStream's read-until-empty takes several chunks per wake-up, where one
        # recv per wake-up would take one (about half the events per second for one stream).
        import upstreams.stream
        direct = [0]
        original = upstreams.stream.UpstreamStream._read_direct

        def counted(stream):  # type: ignore[no-untyped-def]
            direct[0] += 1
            return original(stream)

        pieces = [b'{"n":%d}\n' % i for i in range(400)]
        body = chunked(pieces)
        cuts = []
        at = 0
        for piece in pieces:
            at += len(b"%x\r\n" % len(piece)) + len(piece) + 2
            cuts.append(at)
        upstreams.stream.UpstreamStream._read_direct = counted
        try:
            data, received, response = await self.fetch(body, cuts, pause=0)
        finally:
            upstreams.stream.UpstreamStream._read_direct = original
        self.assertEqual((response.code, data), (200, b"".join(pieces)))
        self.assertLess(direct[0], len(pieces) // 4)

    def token_cuts(self, pieces: list[bytes]) -> list[int]:
        """Cuts for chunked(pieces) that write one chunk at a time."""
        cuts, at = [], 0
        for piece in pieces:
            at += len(b"%x\r\n" % len(piece)) + len(piece) + 2
            cuts.append(at)
        return cuts

    @gen_test(timeout=20)
    async def test_a_trickling_body_is_delivered_from_the_io_handler(self):
        # While tokens trickle in and the delegate takes each at once, the read's coroutine
        # is not resumed per token: one direct read delivers token after token (its sink).
        import upstreams.stream
        reads = [0]
        original = upstreams.stream.UpstreamStream.read_trickle

        def counted(stream, *args):  # type: ignore[no-untyped-def]
            reads[0] += 1
            return original(stream, *args)

        pieces = [b'{"n":%d}\n' % i for i in range(40)]
        received: list[bytes] = []
        upstreams.stream.UpstreamStream.read_trickle = counted
        try:
            response = await self.fetch_with(chunked(pieces), self.token_cuts(pieces),
                                             received.append, pause=0.005)
        finally:
            upstreams.stream.UpstreamStream.read_trickle = original
        self.assertEqual((response.code, b"".join(received)), (200, b"".join(pieces)))
        self.assertGreater(len(received), len(pieces) // 2)  # a token at a time
        self.assertLess(reads[0], len(pieces) // 4)  # one per token before

    async def fetch_with(self, body: bytes, cuts: list[int], on_body, pause: float) -> object:  # type: ignore[no-untyped-def]
        server = RawServer(body, cuts, pause)
        port = await server.start()
        client = http_client(10)
        try:
            # (as UpstreamCall asks: a decompressing delegate is a coroutine per chunk)
            return await client.fetch(HTTPRequest(f"http://127.0.0.1:{port}/", streaming_callback=on_body,
                                                  decompress_response=False, request_timeout=10),
                                      raise_error=False)
        except Exception as e:  # a broken body is an exception, not a status
            return e
        finally:
            client.close()
            server.close()

    @gen_test(timeout=20)
    async def test_what_the_delegate_returns_is_awaited_before_the_next_token(self):
        # Back-pressure: the delegate's client is behind (it returns a future); tokens keep
        # arriving meanwhile, and none is delivered until the future is done.
        loop = asyncio.get_running_loop()
        pieces = [b'{"n":%d}\n' % i for i in range(30)]
        got: list[bytes] = []
        held: list[asyncio.Future] = []
        released_at: list[float] = []
        delivered_at: list[float] = []

        def release(future: asyncio.Future) -> None:
            released_at.append(loop.time())
            future.set_result(None)

        def on_body(data: bytes):  # type: ignore[no-untyped-def]
            got.append(data)
            delivered_at.append(loop.time())
            if len(got) == 5:  # behind for 60 ms: about 12 tokens arrive meanwhile
                future = loop.create_future()
                held.append(future)
                loop.call_later(0.06, release, future)
                return future
            return None

        response = await self.fetch_with(chunked(pieces), self.token_cuts(pieces), on_body, 0.005)
        self.assertEqual((response.code, b"".join(got)), (200, b"".join(pieces)))
        self.assertEqual(len(held), 1)
        self.assertGreater(len(got), 5)
        self.assertGreaterEqual(delivered_at[5], released_at[0])  # nothing while held

    @gen_test(timeout=20)
    async def test_an_error_in_the_delegate_fails_the_fetch(self):
        pieces = [b'{"n":%d}\n' % i for i in range(30)]
        got: list[bytes] = []

        def on_body(data: bytes) -> None:
            got.append(data)
            if len(got) == 8:  # delivered from the IO handler by then
                raise ValueError("the delegate broke")

        response = await self.fetch_with(chunked(pieces), self.token_cuts(pieces), on_body, 0.005)
        # As Tornado's own reader: the connection is closed, the fetch ends (not hangs).
        self.assertEqual(response.code, 599)
        self.assertEqual(len(got), 8)  # and nothing after

    @gen_test(timeout=20)
    async def test_bad_framing_while_the_body_trickles_is_an_error(self):
        pieces = [b'{"n":%d}\n' % i for i in range(12)]
        good = chunked(pieces)[:-5]  # without the last chunk
        body = good + b"zz\r\nabc\r\n0\r\n\r\n"
        got: list[bytes] = []
        response = await self.fetch_with(body, self.token_cuts(pieces) + [len(good)], got.append, 0.005)
        self.assertEqual(response.code, 599)  # as Tornado's own reader: closed, not a hang
        self.assertEqual(b"".join(got), b"".join(pieces))  # what came before, in order

    @gen_test(timeout=20)
    async def test_what_the_delegate_returns_as_it_closes_the_stream_is_still_awaited(self):
        # The relay's callback can abort the call (a line that is not JSON) and, in the same
        # call, hand back a write to wait for: the read fails, the wait must still happen.
        streams: list = []
        awaited = asyncio.Event()
        got: list[bytes] = []

        async def wait_for_the_client() -> None:
            await asyncio.sleep(0)
            awaited.set()

        def on_body(data: bytes):  # type: ignore[no-untyped-def]
            got.append(data)
            if len(got) == 6:  # delivered from the IO handler by then
                streams[0].close()  # as an abort does
                return wait_for_the_client()
            return None

        pieces = [b'{"n":%d}\n' % i for i in range(30)]
        with on_each_connection(lambda stream, made: streams.append(stream)):
            response = await self.fetch_with(chunked(pieces), self.token_cuts(pieces), on_body, 0.005)
        self.assertEqual(response.code, 599)
        await asyncio.wait_for(awaited.wait(), 5)
        self.assertEqual(len(got), 6)

    @gen_test(timeout=20)
    async def test_a_broken_trickling_body_leaves_no_cycle(self):
        # The decoder's error is raised in the read's coroutine: its traceback must not make
        # a cycle back to the connection (only a full garbage collection would free it).
        import gc
        import weakref
        connections: list = []
        pieces = [b'{"n":%d}\n' % i for i in range(12)]
        good = chunked(pieces)[:-5]
        gc.collect()
        gc.disable()
        try:
            with on_each_connection(lambda stream, made: connections.append(weakref.ref(made))):
                response = await self.fetch_with(good + b"zz\r\nabc\r\n0\r\n\r\n",
                                                 self.token_cuts(pieces) + [len(good)], lambda d: None,
                                                 0.005)
            self.assertEqual(response.code, 599)
            upstreams.http.forget_traceback(response)  # (as UpstreamCall.release does)
            del response
            for _ in range(100):  # loop passes for the connection's last callbacks
                if connections[0]() is None:
                    break
                await asyncio.sleep(0)
            self.assertIsNone(connections[0]())
        finally:
            gc.enable()

    @gen_test(timeout=20)
    async def test_the_sink_is_let_go_when_the_body_ends(self):
        # It refers to the connection, which refers to the stream that holds it: kept, it
        # would make a cycle only a full garbage collection frees (runtime/gc_schedule.py).
        streams: list = []
        pieces = [b'{"n":%d}\n' % i for i in range(20)]
        with on_each_connection(lambda stream, made: streams.append(stream)):
            response = await self.fetch_with(chunked(pieces), self.token_cuts(pieces), lambda d: None, 0.005)
            broken = await self.fetch_with(chunked(pieces)[:60], self.token_cuts(pieces)[:5],
                                           lambda d: None, 0.005)
        self.assertEqual(response.code, 200)
        self.assertEqual(broken.code, 599)  # cut mid-body, during a direct read
        self.assertEqual(len(streams), 2)
        for stream in streams:
            self.assertIsNone(stream.upstream.sink)

    @gen_test(timeout=10)
    async def test_chunk_extensions_are_ignored(self):
        data, _, response = await self.fetch(chunked([b"x\n", b"y\n"], b";name=v"), [3])
        self.assertEqual((response.code, data), (200, b"x\ny\n"))

    @gen_test(timeout=10)
    async def test_bad_framing_is_an_error_not_a_hang(self):
        for bad in (b"zz\r\nabc\r\n0\r\n\r\n",          # not hex
                    b"3\r\nabcXY0\r\n\r\n",               # data not followed by CRLF
                    b"1" * 70 + b"\r\n",                   # size line too long
                    b"0\r\nXY"):                           # last chunk not terminated
            _, _, response = await self.fetch(bad, [])
            self.assertIsInstance(response, Exception, bad)

    @gen_test(timeout=10)
    async def test_a_body_cut_mid_chunk_is_an_error(self):
        _, _, response = await self.fetch(b"10\r\nonly part", [])
        self.assertIsInstance(response, Exception)


class ResolverTest(AsyncTestCase):
    @gen_test(timeout=10)
    async def test_ip_literals_need_no_lookup(self):
        resolver = CachingResolver()

        async def refuse(*args):
            raise AssertionError("looked up an IP literal")

        resolver.fallback.resolve = refuse
        self.assertEqual(await resolver.resolve("127.0.0.1", 80), [(socket.AF_INET, ("127.0.0.1", 80))])
        self.assertEqual(await resolver.resolve("::1", 80), [(socket.AF_INET6, ("::1", 80, 0, 0))])

    @gen_test(timeout=10)
    async def test_names_are_looked_up_once_per_ttl(self):
        resolver = CachingResolver(ttl=60)
        calls = []
        real = DefaultLoopResolver()

        async def counting(*args):
            calls.append(args)
            return await real.resolve(*args)

        resolver.fallback.resolve = counting
        first = await resolver.resolve("localhost", 11434)
        self.assertEqual(await resolver.resolve("localhost", 11434), first)
        self.assertEqual(len(calls), 1)
        resolver.ttl = 0
        resolver.cache.clear()
        await resolver.resolve("localhost", 11434)
        await resolver.resolve("localhost", 11434)
        self.assertEqual(len(calls), 3)


class KeepAliveServer:
    """Answers POSTs with a small chunked NDJSON body, several per connection; counts the
    connections.  `close_after_answer` closes each connection once answered, without
    saying so (what a server's idle timeout does); `say_close` sends Connection: close;
    `stall` holds the body open after its first line."""

    def __init__(self, close_after_answer=False, say_close=False, stall=False, stay=False,
                 drop_second=False, stray=False):
        self.stray = stray  # bytes after the body's end
        self.drop_second = drop_second  # a connection's second request: closed unanswered
        self.connections = 0
        self.requests = 0
        self.close_after_answer, self.say_close, self.stall = close_after_answer, say_close, stall
        self.stay = stay  # with say_close: answers on that connection all the same
        self.closed = asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, reader, writer):
        self.connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([h for h in head.split(b"\r\n")
                              if h.lower().startswith(b"content-length")][0].split(b":")[1])
                await reader.readexactly(length)
                self.requests += 1
                if self.drop_second and answered == 1:
                    return  # closed in the client's face: the keep-alive race
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                             + (b"Connection: close\r\n" if self.say_close else b"")
                             + b"Transfer-Encoding: chunked\r\n\r\n")
                writer.write(chunked([b'{"n":1}\n']).removesuffix(b"0\r\n\r\n"))
                if self.stall:
                    await writer.drain()
                    await reader.read()  # until the client closes
                    return
                writer.write(chunked([b'{"n":2,"done":true}\n']) + (b"junk" if self.stray else b""))
                await writer.drain()
                if self.close_after_answer or (self.say_close and not self.stay):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.set()

    def close(self) -> None:
        self.server.close()


class KeepAliveTest(AsyncTestCase):
    async def calls(self, server: KeepAliveServer, n: int, keepalive: int = 4) -> list:
        from upstreams.client import UpstreamClient
        port = await server.start()
        client = UpstreamClient(f"http://127.0.0.1:{port}", settings.defaults(upstream_keepalive=keepalive))
        got = []
        try:
            for _ in range(n):
                lines: list = []

                async def on_lines(new, lines=lines):
                    lines.extend(new)
                call = client.post("/api/chat", b"{}", on_lines)
                await call.finished()
                got.append((lines, call.reused_connection))
        finally:
            client.close()
            server.close()
        return got

    @gen_test(timeout=20)
    async def test_consecutive_requests_share_one_connection(self):
        server = KeepAliveServer()
        got = await self.calls(server, 3)
        self.assertEqual([len(lines) for lines, _ in got], [2, 2, 2])
        self.assertEqual([reused for _, reused in got], [False, True, True])
        self.assertEqual(server.connections, 1)

    @gen_test(timeout=20)
    async def test_keepalive_zero_connects_every_time(self):
        server = KeepAliveServer()
        await self.calls(server, 3, keepalive=0)
        self.assertEqual(server.connections, 3)

    @gen_test(timeout=20)
    async def test_a_connection_the_server_closed_is_not_used_again(self):
        server = KeepAliveServer(close_after_answer=True)
        got = await self.calls(server, 3)
        self.assertEqual([len(lines) for lines, _ in got], [2, 2, 2])  # no request failed
        self.assertEqual(server.connections, 3)

    @gen_test(timeout=20)
    async def test_a_kept_connection_the_server_closed_is_not_handed_out(self):
        # The server's FIN has arrived but the loop has not polled since (a turn taking the
        # kept connection in the same pass as the one that kept it): the pool must look.
        import select
        from upstreams.keepalive import KeptAliveTCPClient
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        pool = KeptAliveTCPClient(CachingResolver(), max_idle=4)
        try:
            first = await pool.connect("127.0.0.1", port)
            pool.keep(first)
            server_side, _ = listener.accept()
            server_side.close()  # FIN, with no loop pass after it
            self.assertTrue(select.select([first.socket], [], [], 5)[0])  # it has arrived
            second = await pool.connect("127.0.0.1", port)
            self.assertIsNot(second, first)
            self.assertTrue(first.closed())
            second.close()
        finally:
            pool.close()
            listener.close()

    @gen_test(timeout=20)
    async def test_connection_close_is_honoured(self):
        server = KeepAliveServer(say_close=True)
        got = await self.calls(server, 2)
        self.assertEqual([reused for _, reused in got], [False, False])
        self.assertEqual(server.connections, 2)

    @gen_test(timeout=20)
    async def test_connection_close_is_honoured_when_the_server_stays_connected(self):
        # The only sign is the header (read before the body, whose headers are then emptied):
        # the connection is not kept, though it stays open and would answer.
        server = KeepAliveServer(say_close=True, stay=True)
        got = await self.calls(server, 2)
        self.assertEqual([reused for _, reused in got], [False, False])
        self.assertEqual([len(lines) for lines, _ in got], [2, 2])
        self.assertEqual(server.connections, 2)

    @gen_test(timeout=20)
    async def test_a_stale_kept_connection_is_retried_on_a_new_one(self):
        # The server closes the kept connection as the next request arrives on it, without
        # answering (its idle timeout fired just then): the request is asked again on a new
        # connection, and the caller sees only the answer.
        server = KeepAliveServer(drop_second=True)
        got = await self.calls(server, 3)
        self.assertEqual([len(lines) for lines, _ in got], [2, 2, 2])
        self.assertEqual(server.connections, 3)
        self.assertEqual(server.requests, 5)  # calls 2 and 3 went out twice

    @gen_test(timeout=20)
    async def test_the_retry_takes_a_new_connection_not_one_kept_meanwhile(self):
        # Under load, other turns keep their connections between a retry's start and its
        # connect, and one of those may be as dead as the first: the retry connects anew.
        from upstreams.client import UpstreamClient
        server = KeepAliveServer(drop_second=True)  # any connection's 2nd request: dropped
        port = await server.start()
        client = UpstreamClient(f"http://127.0.0.1:{port}", settings.defaults(upstream_keepalive=4))
        pool = client.http.tcp_client

        async def on_lines(new):
            pass
        try:
            first = [client.post("/api/chat", b"{}", on_lines) for _ in range(2)]
            for call in first:
                await call.finished()
            (key, kept), = pool.idle.items()
            self.assertEqual(len(kept), 2)  # two connections, each answered once
            spare = kept.pop(0)
            drop_idle = pool.drop_idle

            def drop_then_another_turn_keeps_one():  # type: ignore[no-untyped-def]
                drop_idle()
                pool.keep(spare)

            pool.drop_idle = drop_then_another_turn_keeps_one
            call = client.post("/api/chat", b"{}", on_lines)  # its kept connection: dropped
            await call.finished()  # answered on the retry's own connection
            self.assertEqual(server.connections, 3)
            self.assertEqual(server.requests, 4)
        finally:
            client.close()
            server.close()

    @gen_test(timeout=20)
    async def test_an_aborted_call_does_not_leave_its_connection_for_the_next(self):
        from upstreams.client import UpstreamClient
        from upstreams.errors import UpstreamAborted, UpstreamError
        server = KeepAliveServer(stall=True)
        port = await server.start()
        client = UpstreamClient(f"http://127.0.0.1:{port}", settings.defaults(upstream_keepalive=4))
        try:
            lines_seen = asyncio.Event()

            async def on_lines(new):
                lines_seen.set()
            call = client.post("/api/chat", b"{}", on_lines)
            await lines_seen.wait()
            call.abort(UpstreamAborted("client disconnected"))
            with self.assertRaises(UpstreamError):
                await call.finished()
            await asyncio.wait_for(server.closed.wait(), 5)  # the upstream sees the close
            self.assertEqual(client.http.tcp_client.idle.get(("127.0.0.1", port, False), []), [])
        finally:
            client.close()
            server.close()

    @gen_test(timeout=20)
    async def test_bytes_after_the_body_mean_the_connection_is_not_kept(self):
        server = KeepAliveServer(stray=True)
        got = await self.calls(server, 2)
        self.assertEqual([reused for _, reused in got], [False, False])
        self.assertEqual(server.connections, 2)

    @gen_test(timeout=20)
    async def test_a_connection_kept_too_long_is_not_used_again(self):
        import upstreams.keepalive
        from upstreams.client import UpstreamClient
        server = KeepAliveServer()
        port = await server.start()
        client = UpstreamClient(f"http://127.0.0.1:{port}", settings.defaults(upstream_keepalive=4))
        try:
            await client.post("/api/chat", b"{}", None).finished()
            for idle in client.http.tcp_client.idle.values():
                for stream in idle:
                    stream.upstream.kept_since -= upstreams.keepalive.KEPT_FOR  # as if kept that long
            second = client.post("/api/chat", b"{}", None)
            await second.finished()
            self.assertFalse(second.reused_connection)
            self.assertEqual(server.connections, 2)
        finally:
            client.close()
            server.close()

    @gen_test(timeout=20)
    async def test_a_stream_the_pool_did_not_open_is_closed_not_kept(self):
        from tornado.iostream import IOStream
        from upstreams.keepalive import KeptAliveTCPClient
        pool = KeptAliveTCPClient(DefaultLoopResolver(), 4)
        ours, theirs = socket.socketpair()
        stream = IOStream(ours)  # no StreamState: no key to find it under again
        pool.keep(stream)
        self.assertTrue(stream.closed())
        self.assertEqual(pool.idle, {})
        pool.close()
        theirs.close()

    @gen_test(timeout=20)
    async def test_nothing_is_kept_after_the_client_closed(self):
        # A call that ends cleanly during shutdown, after the client closed its pool.
        from tornado.iostream import IOStream
        from upstreams.keepalive import KeptAliveTCPClient
        from upstreams.stream import StreamState
        pool = KeptAliveTCPClient(DefaultLoopResolver(), 4)
        ours, theirs = socket.socketpair()
        stream = IOStream(ours)
        stream.upstream = StreamState(("h", 1, False))
        pool.close()
        pool.keep(stream)
        self.assertTrue(stream.closed())
        self.assertEqual(pool.idle, {})
        theirs.close()

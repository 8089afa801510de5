"""upstreams/http.py: each change to Tornado's HTTP client, against a raw socket server
that writes exactly the bytes a test gives it, split where the test says."""

import asyncio
import random
import socket

from tornado.httpclient import HTTPRequest
from tornado.netutil import DefaultLoopResolver
from tornado.testing import AsyncTestCase, gen_test

from upstreams.http import CachingResolver, http_client


def chunked(pieces: list[bytes], extension: bytes = b"") -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces)
    return body + b"0\r\n\r\n"


class RawServer:
    """Answers one request with `head + body`, written in the given slices, pausing between."""

    def __init__(self, body: bytes, cuts: list[int]) -> None:
        self.head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.body, self.cuts = body, cuts

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
            await asyncio.sleep(0.001)  # separate reads on the client
            last = cut
        writer.close()

    def close(self) -> None:
        self.server.close()


class BufferedChunkTest(AsyncTestCase):
    async def fetch(self, body: bytes, cuts: list[int]) -> tuple[bytes, list[bytes], object]:
        server = RawServer(body, cuts)
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

"""Bounded resources: requests that end badly are released, metric labels come from fixed
sets, and bodies, headers and idle connections have limits."""

import asyncio
import random
import string
import time

from tornado.testing import gen_test

import jsonfmt
from tests.support import ChatterdTestCase, streams_finished


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


SHORT_BODY = (b"POST /postchatt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000\r\n\r\n{\"name\": \"" + b"x" * 60000)  # 60 KB of 100 KB
BAD_CHUNKS = (b"POST /llmprep HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\n{\"app\r\nzz-not-hex\r\n")


async def aborted_upload(port: int, payload: bytes, read_answer: bool) -> bytes:
    """Send *payload* (headers and part of a body) and leave, or read what comes back first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10) if read_answer else b""
    writer.transport.abort()
    return answer


class AbortedUploadTest(ChatterdTestCase):
    async def upload_and_abort(self, count: int) -> None:
        port = self.get_http_port()
        for start in range(0, count, 50):
            await asyncio.gather(*(
                aborted_upload(port, SHORT_BODY if i % 2 else BAD_CHUNKS, read_answer=i % 4 == 0)
                for i in range(start, min(start + 50, count))))

    @gen_test(timeout=60)
    async def test_aborted_and_malformed_uploads_are_released(self):
        await self.upload_and_abort(100)  # warm up allocators and caches
        await streams_finished(self._app)
        before = rss_kib()
        await self.upload_and_abort(500)
        await streams_finished(self._app)  # waits on the condition; fails if one stays registered
        self.assertEqual(self._app.in_flight, set())
        growth_mib = (rss_kib() - before) / 1024
        print(f"RSS growth after 500 aborted uploads: {growth_mib:.1f} MiB")
        self.assertLess(growth_mib, 10)  # leaked, the 250 half bodies alone hold ~15 MB
        started = time.monotonic()
        await self._app.drain(grace=10)
        self.assertLess(time.monotonic() - started, 0.5)  # nothing to wait for

    @gen_test(timeout=20)
    async def test_malformed_chunks_get_400_and_are_released(self):
        answer = await aborted_upload(self.get_http_port(), BAD_CHUNKS, read_answer=True)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        await streams_finished(self._app)
        # The handler was registered (the body is streamed) and released exactly once.
        self.assertEqual(self._app.in_flight, set())
        response = await self.http_client.fetch(self.get_url("/healthz"))
        self.assertEqual(jsonfmt.loads(response.body), {"status": "ok"})


async def pipelined(port: int, requests: list[bytes]) -> int:
    """Send *requests* on one connection at once; return how many answers came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(requests))
    await writer.drain()
    seen = bytearray()
    while (answers := seen.count(b"HTTP/1.1 ")) < len(requests):
        data = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert data, f"connection closed after {answers} of {len(requests)} answers"
        seen += data
    writer.transport.abort()
    return answers


class MetricLabelTest(ChatterdTestCase):
    @gen_test(timeout=60)
    async def test_random_methods_and_paths_add_no_series(self):
        rng = random.Random(7)

        def request(i: int) -> bytes:
            method = "".join(rng.choices(string.ascii_uppercase, k=10)).encode()
            path = b"/healthz" if i % 2 else b"/nowhere-%d" % i
            return method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"

        started = time.monotonic()
        port = self.get_http_port()
        counts = await asyncio.gather(*(pipelined(port, [request(c * 500 + i) for i in range(500)])
                                        for c in range(20)))
        self.assertEqual(sum(counts), 10_000)
        self.assertLess(time.monotonic() - started, 40)
        response = await self.http_client.fetch(self.get_url("/metrics"))
        series = [line for line in response.body.decode().splitlines()
                  if line.startswith("chatterd_requests_total{")]
        print(f"/metrics after 10,000 random methods: {len(response.body)} bytes, "
              f"{len(series)} request series")
        self.assertLess(len(series), 200)
        self.assertLess(len(response.body), 64 * 1024)
        self.assertTrue(any('method="other"' in s and 'route="/healthz"' in s and 'status="405"' in s
                            for s in series), series)
        self.assertTrue(any('route="unmatched"' in s for s in series), series)


def test_metric_labels_come_from_fixed_sets():
    from types import SimpleNamespace

    from chatterd import metric_labels
    from handlers.base import NotFoundHandler
    from handlers.ops import HealthHandler

    def labels(method, status, cls=HealthHandler):
        handler = cls.__new__(cls)
        handler.request = SimpleNamespace(method=method)
        handler.get_status = lambda: status
        return metric_labels(handler)

    assert labels("GET", 200) == {"route": "/healthz", "method": "GET", "status": "200"}
    assert labels("BREW", 418)["method"] == "other"
    assert labels("GET", 499)["status"] == "499"
    assert labels("GET", 597)["status"] == "5xx"  # an odd upstream status keeps its class
    assert labels("GET", 1234)["status"] == "other"
    assert labels("GET", 404, cls=NotFoundHandler)["route"] == "unmatched"


class ConnectionLimitTest(ChatterdTestCase):
    """chatterd's own server (chatterd.make_server) with small timeouts."""

    settings_overrides = {"idle_connection_timeout": 0.5, "body_timeout": 0.5}

    def get_http_server(self):
        import chatterd

        return chatterd.make_server(self._app)

    async def cut_after(self, payload: bytes, trickle: bytes = b"") -> float:
        """Send *payload*, then a byte of *trickle* every 0.1 s; seconds until the server closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
        started = time.monotonic()
        writer.write(payload)

        async def trickle_bytes():
            for i in range(len(trickle)):
                await asyncio.sleep(0.1)
                writer.write(trickle[i:i + 1])

        dribble = asyncio.ensure_future(trickle_bytes())
        try:
            while await asyncio.wait_for(reader.read(65536), 5):
                pass  # an answer (or nothing) and then the end of the connection
        finally:
            dribble.cancel()
            writer.transport.abort()
        return time.monotonic() - started

    @gen_test(timeout=30)
    async def test_slowloris_headers_are_cut_at_the_header_deadline(self):
        # Half the headers, then one byte every 0.1 s: it never finishes, and trickling
        # does not extend the deadline.
        elapsed = await self.cut_after(b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 100)
        self.assertLess(elapsed, 2.0)

    @gen_test(timeout=30)
    async def test_idle_connection_is_closed(self):
        elapsed = await self.cut_after(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertLess(elapsed, 2.0)

    @gen_test(timeout=30)
    async def test_slow_body_is_cut_and_its_request_released(self):
        elapsed = await self.cut_after(
            b"POST /postchatt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{", b"\"" * 100)
        self.assertLess(elapsed, 2.0)
        await streams_finished(self._app)

    @gen_test(timeout=30)
    async def test_a_body_to_an_endpoint_that_takes_none_is_413_unread(self):
        for path in (b"/healthz", b"/metrics", b"/getchatts", b"/", b"/nowhere"):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
            started = time.monotonic()
            # Only the headers: the answer must not wait for the 1 MB.  (Sending some of it
            # would race the server's close against unread data, which resets the connection.)
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.transport.abort()
            self.assertTrue(answer.startswith(b"HTTP/1.1 413"), (path, answer))
            self.assertIn(b"takes no request body", answer)
            self.assertLess(time.monotonic() - started, 1.0)
        # A chunked body past the limit is refused too (Tornado's bare 400), and released.
        answer = await aborted_upload(
            self.get_http_port(), b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % 8192, read_answer=True)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        # A small body is still accepted (and ignored).
        response = await self.http_client.fetch(self.get_url("/healthz"), method="GET",
                                                body=b"x" * 100, allow_nonstandard_methods=True)
        self.assertEqual(response.code, 200)
        await streams_finished(self._app)
        metrics = (await self.http_client.fetch(self.get_url("/metrics"))).body.decode()
        self.assertIn('route="/healthz",status="413"', metrics)

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
              b"Content-Length: 100000\r\n\r\n{\"name\": \"half")
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
        self.assertLess(growth_mib, 20)
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

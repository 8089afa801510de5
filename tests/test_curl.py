"""Real `curl -N` reads the stream as it is produced, and what it gets parses as strict SSE."""

import asyncio

from tornado.testing import gen_test

import jsonfmt
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_body


class CurlTest(ChatterdTestCase):
    @gen_test(timeout=30)
    async def test_curl_sees_events_while_the_model_is_still_generating(self):
        self.double.behave("slow", token_delay=0.2)
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-N", "-X", "POST", self.get_url("/llmchat"),
            "-H", "Content-Type: application/json",
            "-d", jsonfmt.dumps(chat_body("curl", "hi", model="slow")),
            stdout=asyncio.subprocess.PIPE)
        try:
            first = await asyncio.wait_for(proc.stdout.readuntil(b"\n\n"), 10)
            self.assertTrue(first.startswith(b": context sent="))  # what the turn sends
            first += await asyncio.wait_for(proc.stdout.readuntil(b"\n\n"), 10)
            self.assertRegex(first.split(b"\n\n")[1], rb"^id: \d+:1\ndata: \{")
            upstream = self.double.chat_requests()[0]
            self.assertIsNone(upstream.finished_at, "the first event reached curl only at the end")
            rest = await asyncio.wait_for(proc.stdout.read(), 20)
            self.assertEqual(await proc.wait(), 0)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        events, _ = parse(first + rest)
        self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
        self.assertEqual((await self.conversation("curl"))[-1]["status"], "complete")

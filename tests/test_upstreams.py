"""OpenAI-compatible upstreams behind the course API, routing and failover (the doubles)."""

import asyncio
import socket

import pytest

import jsonfmt
import settings
from tests.openai_double import OpenAIDouble
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_body, streams_finished
from upstreams.openai import ChunkTranslator, ollama_to_openai_request, parse_openai_url
from upstreams.router import parse_upstreams
from upstreams.errors import UpstreamBroken


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# -- the translation, unit by unit ------------------------------------------------------

def sse(*objs) -> list[bytes]:
    return [b"data: " + (o if isinstance(o, bytes) else jsonfmt.dumpb(o)) for o in objs]


def delta(d, finish=None):
    return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def test_chunks_become_ollama_lines_with_counts_and_done_reason():
    t = ChunkTranslator("mine")
    lines = t.feed(sse(delta({"role": "assistant", "content": ""}), delta({"content": "Hi"}),
                       delta({"reasoning_content": "hmm"}), delta({}, "length"),
                       {"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
                   + [b": keepalive", b"data: [DONE]"])
    objs = [jsonfmt.loads(x) for x in lines]
    assert [o["message"].get("content") for o in objs[:2]] == ["Hi", ""]
    assert objs[1]["message"]["thinking"] == "hmm"
    final = objs[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert (final["prompt_eval_count"], final["eval_count"]) == (7, 2)
    assert all(o["model"] == "mine" and o["created_at"].endswith("Z") for o in objs)
    assert t.end() == []


def test_tool_call_fragments_repeated_ids_and_interleaving_are_delivered_whole():
    t = ChunkTranslator("m")
    lines = t.feed(sse(
        delta({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        delta({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "add", "arguments": "{\"x\""}}]}),
        delta({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "get_weather",
                                                                   "arguments": "{\"city\":"}}]}),
        delta({"tool_calls": [{"index": 1, "function": {"arguments": ": 1}"}}]}),
        delta({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "get_weather",
                                                                   "arguments": " \"Tokyo\"}"}}]}),
        delta({}, "tool_calls")) + [b"data: [DONE]"])
    objs = [jsonfmt.loads(x) for x in lines]
    assert len(objs) == 2  # the calls in one line, then done
    calls = objs[0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", "get_weather", {"city": "Tokyo"}), ("b", "add", {"x": 1})]
    assert objs[1]["done_reason"] == "stop"


def test_error_chunk_and_old_error_field_become_error_lines():
    t = ChunkTranslator("m", label="up")
    (line,) = t.feed(sse(delta({"content": "a"}))[:0] + sse({"error": {"message": "boom", "code": 500}}))
    assert jsonfmt.loads(line) == {"error": "up: boom"}
    t = ChunkTranslator("m", label="up")
    (line,) = t.feed([b'error: {"message": "context too long"}'])
    assert "context too long" in jsonfmt.loads(line)["error"]


def test_end_without_done_is_fine_after_finish_and_an_error_before():
    t = ChunkTranslator("m")
    t.feed(sse(delta({"content": "a"}), delta({}, "stop")))
    assert jsonfmt.loads(t.end()[-1])["done"] is True
    t = ChunkTranslator("m")
    t.feed(sse(delta({"content": "a"})))
    with pytest.raises(UpstreamBroken):
        t.end()


def test_generate_lines_use_response():
    t = ChunkTranslator("m", generate=True)
    objs = [jsonfmt.loads(x) for x in t.feed(sse(delta({"content": "a"}), delta({}, "stop"))
                                             + [b"data: [DONE]"])]
    assert objs[0]["response"] == "a" and objs[-1]["done"] is True and "message" not in objs[0]


def test_ollama_request_translation():
    body = {"model": "m", "stream": True, "options": {"temperature": 0, "num_predict": 5, "top_p": 0.5,
                                                      "seed": 3, "stop": ["\n"], "num_ctx": 99},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "",
                          "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
                         {"role": "tool", "content": "42", "tool_name": "f"}]}
    out = ollama_to_openai_request("/api/chat", body)
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert (out["temperature"], out["max_tokens"], out["top_p"], out["seed"], out["stop"]) == \
        (0, 5, 0.5, 3, ["\n"])
    assert "num_ctx" not in out and out["tools"] == body["tools"]
    call = out["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and jsonfmt.loads(call["function"]["arguments"]) == {"a": 1}
    assert out["messages"][1]["content"] is None
    assert out["messages"][2]["tool_call_id"] == call["id"]
    gen = ollama_to_openai_request("/api/generate", {"model": "m", "prompt": "p", "system": "s"})
    assert gen["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]


def test_api_key_is_kept_out_of_names():
    base, name, key = parse_openai_url("openai+https://:sk-secret@api.example.com/v1/")
    assert (base, name, key) == ("https://api.example.com/v1", "openai+https://api.example.com/v1",
                                 "sk-secret")
    with pytest.raises(ValueError) as caught:
        parse_upstreams(settings.defaults(upstreams="openai+ftp://:sk-secret@x/v1"))
    assert "sk-secret" not in str(caught.value)


# -- through chatterd ---------------------------------------------------------------------

class UpstreamsTestCase(ChatterdTestCase):
    """chatterd with upstreams = what `upstream_specs()` returns (doubles started first)."""

    settings_overrides = {"connect_timeout": 1.0, "upstream_cooldown": 10.0}

    def get_app(self):
        self.openai = OpenAIDouble()
        self.openai.listen()
        self.openai2 = OpenAIDouble(models=("gpt-double", "other"))
        self.openai2.listen()
        return super().get_app()

    def upstream_specs(self) -> str:
        return f"openai+http://:sk-test-KEY@127.0.0.1:{self.openai.port}/v1,{self.double.url}"

    def tearDown(self):
        self.io_loop.run_sync(self.openai.stop)
        self.io_loop.run_sync(self.openai2.stop)
        super().tearDown()

    def chat(self, body, path="/llmchat"):
        response = self.post_json(path, body)
        events = parse(response.body)[0] if response.code == 200 else []
        return response, events


class OpenAIUpstreamTest(UpstreamsTestCase):
    def test_a_routed_stream_false_turn_is_recorded_delivered(self):
        # The same question again after its answer arrived is a new turn, not a resend.
        for model in ("gpt-double", "llama3.2"):
            body = chat_body(f"once-{model}", "ok", model=model, stream=False)
            first = self.post_json("/llmchat", body)
            self.io_loop.run_sync(self._app.turns.flush_delivered)
            second = self.post_json("/llmchat", body)
            self.assertEqual((first.code, second.code), (200, 200))
            self.assertNotIn("X-Chatterd-Replayed", second.headers)
            self.assertEqual(len(self.rows(f"once-{model}")), 4)

    def test_llmchat_streams_ollama_lines_and_stores_the_reply(self):
        response, events = self.chat(chat_body("a1", "hi", model="gpt-double"))
        self.assertEqual(response.code, 200)
        chunks = [jsonfmt.loads(e.data) for e in events]
        self.assertEqual("".join(c["message"]["content"] for c in chunks), "Hello from the OpenAI double.")
        self.assertTrue(chunks[-1]["done"])
        self.assertEqual(chunks[-1]["model"], "gpt-double")
        self.assertEqual(chunks[-1]["eval_count"], 5)
        rows = self.rows("a1")
        self.assertEqual([(r["role"], r["content"]) for r in rows],
                         [("user", "hi"), ("assistant", "Hello from the OpenAI double.")])
        self.assertEqual(rows[1]["tokens"], 5)
        sent = self.openai.chats()[0]
        self.assertEqual(sent.headers["Authorization"], "Bearer sk-test-KEY")
        self.assertEqual(sent.body["messages"], [{"role": "user", "content": "hi"}])
        self.assertTrue(sent.body["stream"])
        self.assertEqual(self.double.chat_requests(), [])  # the Ollama double was not asked

    def test_second_turn_sends_history(self):
        self.chat(chat_body("a2", "one", model="gpt-double"))
        self.chat(chat_body("a2", "two", model="gpt-double"))
        self.assertEqual([m["content"] for m in self.openai.chats()[1].body["messages"]],
                         ["one", "Hello from the OpenAI double.", "two"])

    def test_tool_calls_arrive_whole_and_are_stored(self):
        self.openai.script("tools", reply="", tool_calls=[("get_weather", '{"city": "Tokyo"}'),
                                                          ("add", '{"a": 1, "b": 2}')],
                           repeat_id_name=True, interleave=True, fragment=3)
        response, events = self.chat(chat_body("t1", "weather?", model="tools"))
        chunks = [jsonfmt.loads(e.data) for e in events]
        with_calls = [c for c in chunks if c["message"].get("tool_calls")]
        self.assertEqual(len(with_calls), 1)
        calls = with_calls[0]["message"]["tool_calls"]
        self.assertEqual([(c["function"]["name"], c["function"]["arguments"]) for c in calls],
                         [("get_weather", {"city": "Tokyo"}), ("add", {"a": 1, "b": 2})])
        self.assertEqual([c["id"] for c in calls], ["call_0_double", "call_1_double"])
        self.assertEqual(chunks[-1]["done_reason"], "stop")
        rows = self.rows("t1")
        self.assertEqual(rows[1]["extra"]["tool_calls"], calls)

    def test_reasoning_keepalives_and_crlf(self):
        self.openai.script("think", reasoning="Let me think", reasoning_field="reasoning",
                           keepalive=True, crlf=True)
        response, events = self.chat(chat_body("r1", "q", model="think"))
        chunks = [jsonfmt.loads(e.data) for e in events]
        self.assertEqual("".join(c["message"].get("thinking", "") for c in chunks), "Let me think")
        self.assertEqual("".join(c["message"]["content"] for c in chunks), "Hello from the OpenAI double.")
        self.assertTrue(chunks[-1]["done"])

    def test_error_chunk_mid_stream_is_an_error_event_and_a_failed_turn(self):
        self.openai.script("err", error_after=2, error="CUDA out of memory")
        response, events = self.chat(chat_body("e1", "q", model="err"))
        self.assertEqual(events[-1].event, "error")
        self.assertIn("CUDA out of memory", events[-1].data)
        self.assertEqual(self.rows("e1")[1]["status"], "failed")

    def test_stream_without_done_after_finish_is_complete(self):
        self.openai.script("nodone", send_done=False)
        response, events = self.chat(chat_body("n1", "q", model="nodone"))
        self.assertTrue(jsonfmt.loads(events[-1].data)["done"])

    def test_stream_cut_without_finish_or_done_is_failed(self):
        self.openai.script("cut", send_done=False, send_finish=False)
        response, events = self.chat(chat_body("n2", "q", model="cut"))
        self.assertEqual(events[-1].event, "error")
        self.assertIn("[DONE]", events[-1].data)
        self.assertEqual(self.rows("n2")[1]["status"], "failed")

    def test_stream_false_is_one_ollama_object(self):
        body = chat_body("s1", "q", model="gpt-double", stream=False)
        response = self.post_json("/llmchat", body)
        answer = jsonfmt.loads(response.body)
        self.assertEqual(answer["message"]["content"], "Hello from the OpenAI double.")
        self.assertTrue(answer["done"])
        self.assertEqual(self.rows("s1")[1]["content"], "Hello from the OpenAI double.")

    def test_llmprompt_through_an_openai_upstream(self):
        response = self.post_json("/llmprompt", {"model": "gpt-double", "prompt": "p"})
        lines = [jsonfmt.loads(x) for x in response.body.splitlines()]
        self.assertEqual(response.headers["Content-Type"], "application/x-ndjson")
        self.assertEqual("".join(x["response"] for x in lines), "Hello from the OpenAI double.")
        self.assertTrue(lines[-1]["done"])

    def test_unlisted_model_goes_to_ollama_which_answers(self):
        response, events = self.chat(chat_body("o1", "q", model="llama3.2"))
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.double.chat_requests()), 1)
        response, _ = self.chat(chat_body("o2", "q", model="nosuch"))
        self.assertEqual(response.code, 404)
        self.assertIn("model 'nosuch' not found", jsonfmt.loads(response.body)["error"])

    def test_status_before_stream_from_openai_upstream_passes_through(self):
        self.openai.script("bad", status=400, error="bad request, really")
        response, _ = self.chat(chat_body("b1", "q", model="bad"))
        self.assertEqual(response.code, 400)
        self.assertIn("bad request, really", jsonfmt.loads(response.body)["error"])
        self.assertEqual(self.rows("b1"), [])

    def test_client_disconnect_closes_the_upstream_request(self):
        self.openai.script("slow", stall=True)

        async def go():
            from tests.support import chat_and_leave
            await chat_and_leave(self.get_http_port(), chat_body("d1", "q", model="slow"),
                                 wait_for=b"Hello")
            await asyncio.wait_for(self.openai.chats()[0].closed.wait(), 5)
            await streams_finished(self._app)
        self.io_loop.run_sync(go)
        self.assertEqual(self.rows("d1")[1]["status"], "interrupted")

    def test_readyz_and_metrics_show_upstreams_without_the_key(self):
        self.chat(chat_body("m1", "q", model="gpt-double"))
        ready = self.fetch("/readyz")
        body = jsonfmt.loads(ready.body)
        self.assertEqual([u["dialect"] for u in body["upstreams"]], ["openai", "ollama"])
        self.assertTrue(all(u["ok"] for u in body["upstreams"]))
        self.assertIn("gpt-double", body["upstreams"][0]["models"])
        self.assertEqual((body["upstreams"][0]["requests"], body["upstreams"][0]["failures"]), (1, 0))
        metrics = self.fetch("/metrics").body.decode()
        self.assertIn('chatterd_upstream_requests_total{upstream="0:openai+http://127.0.0.1:', metrics)
        for text in (ready.body.decode(), metrics):
            self.assertNotIn("sk-test-KEY", text)


class NoOllamaTest(UpstreamsTestCase):
    def upstream_specs(self):
        return f"openai+http://127.0.0.1:{self.openai.port}/v1"

    def test_unlisted_model_is_404_from_chatterd(self):
        response, _ = self.chat(chat_body("x", "q", model="llama3.2"))
        self.assertEqual(response.code, 404)
        self.assertEqual(self.openai.chats(), [])

    def test_model_added_later_is_found_on_a_miss(self):
        import upstreams.router as router
        self.chat(chat_body("x", "q", model="gpt-double"))
        self.openai.models.append("newcomer")
        old, router.MISS_REFRESH = router.MISS_REFRESH, 0.0
        try:
            response, _ = self.chat(chat_body("y", "q", model="newcomer"))
        finally:
            router.MISS_REFRESH = old
        self.assertEqual(response.code, 200)


class FailoverTest(UpstreamsTestCase):
    settings_overrides = {"upstream_cooldown": 30.0}

    def upstream_specs(self):
        dead = closed_port()
        return (f"openai+http://127.0.0.1:{dead}/v1,openai+http://127.0.0.1:{self.openai.port}/v1,"
                f"openai+http://127.0.0.1:{self.openai2.port}/v1")

    async def make_upstreams(self):
        router = await super().make_upstreams()
        await router.refresh()
        router.members[0].remember(["gpt-double"])  # it listed the model, then died
        router.members[0].listed_at = 1.0
        return router

    def test_dead_then_5xx_then_good_is_transparent(self):
        self.openai.script("gpt-double", status=503, error="loading model")
        response, events = self.chat(chat_body("f1", "q", model="gpt-double"))
        self.assertEqual(response.code, 200, response.body)
        self.assertTrue(jsonfmt.loads(events[-1].data).get("done"), response.body)
        self.assertEqual(len(self.openai.chats()), 1)
        self.assertEqual(len(self.openai2.chats()), 1)
        metrics = self.fetch("/metrics").body.decode()
        self.assertRegex(metrics, r'chatterd_upstream_healthy\{upstream="0:[^"]+"\} 0\.0')
        self.assertRegex(metrics, r'chatterd_upstream_failures_total\{upstream="1:[^"]+"\} 1\.0')
        # Cooling down: the next turn goes to the healthy one first.
        self.openai.script("gpt-double", status=200)
        self.chat(chat_body("f2", "q", model="gpt-double"))
        self.assertEqual(len(self.openai2.chats()), 2)
        self.assertEqual(len(self.openai.chats()), 1)

    def test_429_fails_over_and_last_status_is_the_answer(self):
        self.openai.script("gpt-double", status=429, error="slow down")
        self.openai2.script("gpt-double", status=500, error="broken")
        response, _ = self.chat(chat_body("f3", "q", model="gpt-double"))
        self.assertEqual(response.code, 500)
        self.assertIn("broken", jsonfmt.loads(response.body)["error"])
        self.assertEqual(self.rows("f3"), [])

    def test_error_after_the_stream_started_is_not_failed_over(self):
        self.openai.script("gpt-double", error_after=1)
        response, events = self.chat(chat_body("f4", "q", model="gpt-double"))
        self.assertEqual(events[-1].event, "error")
        self.assertEqual(self.openai2.chats(), [])

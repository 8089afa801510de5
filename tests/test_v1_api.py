"""/v1/chat/completions and /v1/models with the official `openai` package as the client."""

import openai
from tornado.testing import gen_test

import jsonfmt
from tests.ollama_double import default_reply
from tests.support import chat_body
from tests.test_upstreams import UpstreamsTestCase

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


class V1Test(UpstreamsTestCase):
    """OpenAI double (gpt-double, tools models) first, then the Ollama double."""

    def sdk(self, **headers) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.get_http_port()}/v1",
                                  api_key="unused", max_retries=0, timeout=20,
                                  default_headers=headers or None)

    @gen_test(timeout=30)
    async def test_streaming_from_both_dialects(self):
        async with self.sdk() as client:
            for model, expected in (("gpt-double", "Hello from the OpenAI double."),
                                    ("llama3.2", default_reply([{"role": "user", "content": "hi"}]))):
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
                chunks = [c async for c in stream]
                self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                                 expected)
                self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
                self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
                self.assertEqual({c.id for c in chunks}, {chunks[0].id})
                self.assertEqual({c.object for c in chunks}, {"chat.completion.chunk"})
                self.assertEqual(chunks[0].model, model)
        self.assertEqual(await self.conversation("(stateless)"), [])

    @gen_test(timeout=30)
    async def test_include_usage_is_a_last_chunk_without_choices(self):
        async with self.sdk() as client:
            stream = await client.chat.completions.create(
                model="gpt-double", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            chunks = [c async for c in stream]
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens), (11, 5))
        self.assertTrue(all(c.usage is None for c in chunks[:-1]))

    @gen_test(timeout=30)
    async def test_non_streaming(self):
        async with self.sdk() as client:
            answer = await client.chat.completions.create(
                model="gpt-double", messages=[{"role": "system", "content": "terse"},
                                              {"role": "user", "content": "hi"}],
                temperature=0, max_tokens=5, seed=1)
        self.assertEqual(answer.object, "chat.completion")
        self.assertEqual(answer.choices[0].message.content, "Hello from the OpenAI double.")
        self.assertEqual(answer.choices[0].finish_reason, "stop")
        self.assertEqual(answer.usage.completion_tokens, 5)
        sent = self.openai.chats()[0].body
        self.assertEqual((sent["temperature"], sent["max_tokens"], sent["seed"]), (0, 5, 1))
        self.assertEqual(sent["messages"][0], {"role": "system", "content": "terse"})

    @gen_test(timeout=30)
    async def test_tool_calls_streamed_and_not_and_the_tool_result_round_trip(self):
        self.openai.script("tools", reply="", tool_calls=[("get_weather", '{"city": "Tokyo"}')],
                           fragment=2)
        async with self.sdk() as client:
            stream = await client.chat.completions.create(
                model="tools", messages=[{"role": "user", "content": "weather in Tokyo?"}],
                tools=WEATHER, stream=True)
            chunks = [c async for c in stream]
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            self.assertEqual(len(calls), 1)
            self.assertEqual(calls[0].function.name, "get_weather")
            self.assertEqual(jsonfmt.loads(calls[0].function.arguments), {"city": "Tokyo"})
            self.assertEqual(chunks[-1].choices[0].finish_reason, "tool_calls")
            answer = await client.chat.completions.create(
                model="tools", messages=[{"role": "user", "content": "weather in Tokyo?"}],
                tools=WEATHER)
            call = answer.choices[0].message.tool_calls[0]
            self.assertEqual(answer.choices[0].finish_reason, "tool_calls")
            self.assertEqual(call.id, "call_0_double")
            await client.chat.completions.create(model="gpt-double", tools=WEATHER, messages=[
                {"role": "user", "content": "weather in Tokyo?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
        sent = self.openai.chats()[-1].body["messages"]
        self.assertEqual(sent[1]["tool_calls"][0]["id"], "call_0_double")
        self.assertEqual(jsonfmt.loads(sent[1]["tool_calls"][0]["function"]["arguments"]),
                         {"city": "Tokyo"})
        self.assertEqual(sent[2], {"role": "tool", "content": "sunny", "tool_call_id": "call_0_double"})
        self.assertEqual(self.openai.chats()[0].body["tools"], WEATHER)

    @gen_test(timeout=30)
    async def test_errors_are_openai_errors_with_real_statuses(self):
        self.openai.script("busy", status=429, error="slow down")
        self.openai.script("midway", error_after=1, error="exploded")
        async with self.sdk() as client:
            with self.assertRaises(openai.NotFoundError) as caught:
                await client.chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "x"}])
            self.assertIn("nosuch", caught.exception.message)
            self.assertEqual(caught.exception.body["type"], "not_found_error")
            with self.assertRaises(openai.BadRequestError):
                await client.chat.completions.create(model="gpt-double", messages=[])
            with self.assertRaises(openai.RateLimitError):
                await client.chat.completions.create(model="busy", messages=[{"role": "user", "content": "x"}])
            with self.assertRaises(openai.RateLimitError):  # stream: still before the stream
                await client.chat.completions.create(model="busy", stream=True,
                                                     messages=[{"role": "user", "content": "x"}])
            stream = await client.chat.completions.create(
                model="midway", stream=True, messages=[{"role": "user", "content": "x"}])
            with self.assertRaises(openai.APIError) as caught:
                async for _ in stream:
                    pass
            self.assertIn("exploded", caught.exception.message)
            with self.assertRaises(openai.BadRequestError):  # an appID too long
                await client.chat.completions.create(
                    model="gpt-double", messages=[{"role": "user", "content": "x"}],
                    extra_headers={"X-Chatterd-AppID": "a" * 200})

    @gen_test(timeout=30)
    async def test_app_id_header_shares_the_conversation_with_llmchat(self):
        response = await self.http_client.fetch(
            self.get_url("/llmchat"), method="POST",
            body=jsonfmt.dumps(chat_body("mix", "My name is Ishmael.", model="gpt-double")))
        self.assertEqual(response.code, 200)
        async with self.sdk(**{"X-Chatterd-AppID": "mix"}) as client:
            stream = await client.chat.completions.create(
                model="gpt-double", stream=True, messages=[{"role": "user", "content": "Who am I?"}])
            [c async for c in stream]
            await client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "Third."}])
        sent = self.openai.chats()[1].body["messages"]
        self.assertEqual([m["content"] for m in sent],
                         ["My name is Ishmael.", "Hello from the OpenAI double.", "Who am I?"])
        rows = await self.conversation("mix")
        self.assertEqual([r["content"] for r in rows][:4],
                         ["My name is Ishmael.", "Hello from the OpenAI double.", "Who am I?",
                          "Hello from the OpenAI double."])
        self.assertEqual(len(rows), 6)
        self.assertEqual(rows[4]["content"], "Third.")
        ollama_sent = self.double.chat_requests()[0].body["messages"]
        self.assertEqual(len(ollama_sent), 5)

    @gen_test(timeout=30)
    async def test_models_lists_every_upstream(self):
        async with self.sdk() as client:
            models = [m.id async for m in client.models.list()]
        self.assertIn("gpt-double", models)
        self.assertIn("llama3.2", models)
        self.assertNotIn("sk-test-KEY", jsonfmt.dumps(models))

    @gen_test(timeout=30)
    async def test_a_resend_on_v1_gets_the_stored_answer_in_openais_shape(self):
        """The turn contract's replay speaks the client's dialect: a resent turn whose answer
        never reached the SDK client comes back as OpenAI chunks, then [DONE]."""
        async with self.sdk(**{"X-Chatterd-AppID": "v1rs"}) as client:
            messages = [{"role": "user", "content": "Once only."}]
            first = await client.chat.completions.create(model="llama3.2", messages=messages,
                                                         stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in first if c.choices])
            self._app.turns._delivered.clear()  # as if the process died before `done` went out
            again = await client.chat.completions.create(model="llama3.2", messages=messages,
                                                         stream=True)
            chunks = [c async for c in again]
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                         text)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        self.assertEqual(len(self.double.chat_requests()), 1)  # the model was asked once
        self.assertEqual([r["content"] for r in await self.conversation("v1rs")],
                         ["Once only.", text])

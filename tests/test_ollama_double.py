"""Proves tests/ollama_double.py speaks Ollama's wire format, using the official client.

Everything runs over real sockets on 127.0.0.1. Nothing sleeps to wait for an outcome:
tests wait on events and responses, with generous timeouts.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import ollama
import pytest
import tornado.httpclient
from tornado.testing import AsyncTestCase, bind_unused_port, gen_test

from tests.ollama_double import Behavior, OllamaDouble, default_reply, split_tokens, tool_call

ROOT = Path(__file__).resolve().parent.parent
CHUNK_KEYS = ["model", "created_at", "message", "done"]
FINAL_KEYS = CHUNK_KEYS + ["done_reason", "total_duration", "load_duration", "prompt_eval_count",
                           "prompt_eval_duration", "eval_count", "eval_duration"]
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?Z$")
MESSAGES = [{"role": "system", "content": "Be  terse.\n"},
            {"role": "user", "content": "Hi <there> & \"you\"\t\u00e9\u2028!"}]


def test_split_tokens_and_default_reply() -> None:
    text = default_reply(MESSAGES)
    assert "".join(split_tokens(text)) == text
    assert all(piece for piece in split_tokens(text))
    assert default_reply(MESSAGES) == text  # deterministic
    assert default_reply(MESSAGES + [{"role": "assistant", "content": "x"}, MESSAGES[1]]) != text
    assert "<" in text and "&" in text and "  " in text and "\t" in text


# --- standalone process + synchronous client -------------------------------------------


def _wait_until_up(proc: subprocess.Popen, url: str, deadline: float) -> None:
    """Process start-up only: retry connecting until the server answers."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                assert response.read() == b"Ollama is running"
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"double did not start (exit code {proc.poll()})") from None
            time.sleep(0.05)


def test_standalone_with_sync_client() -> None:
    sock, port = bind_unused_port()
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ollama_double", "--port", str(port), "--token-delay", "0.001"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, url, time.monotonic() + 30)
        with ollama.Client(host=url) as client:
            expected = default_reply(MESSAGES)

            parts = list(client.chat(model="llama3.2", messages=MESSAGES, stream=True))
            assert "".join(p.message.content for p in parts) == expected
            assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
            last = parts[-1]
            assert last.done_reason == "stop" and last.model == "llama3.2"
            assert last.eval_count == len(split_tokens(expected)) == len(parts) - 1
            assert last.prompt_eval_count and last.total_duration and last.eval_duration

            whole = client.chat(model="any-model:7b", messages=MESSAGES, stream=False)
            assert whole.message.content == expected and whole.done and whole.model == "any-model:7b"

            generated = client.generate(model="llama3.2", prompt="Say hi")
            assert generated.response == default_reply([{"role": "user", "content": "Say hi"}])
            streamed = list(client.generate(model="llama3.2", prompt="Say hi", stream=True))
            assert "".join(p.response for p in streamed) == generated.response
            assert streamed[-1].done and streamed[-1].eval_count == len(streamed) - 1

            listed = client.list()
            assert "llama3.2:latest" in [m.model for m in listed.models]
            assert all(m.modified_at and m.details and m.details.format == "gguf" for m in listed.models)
            assert httpx.get(f"{url}/api/version").json() == {"version": "0.12.6"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
            log = proc.stderr.read().decode() if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
    assert code == 0, log
    assert "POST /api/chat" in log and "Traceback" not in log


# --- in-process --------------------------------------------------------------------------


class InProcessTest(AsyncTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.double = OllamaDouble()
        self.double.listen()
        self.client = ollama.AsyncClient(host=self.double.url)
        self.http = tornado.httpclient.AsyncHTTPClient()

    def tearDown(self) -> None:
        async def cleanup() -> None:
            await self.client.close()
            await self.double.stop()

        self.io_loop.run_sync(cleanup, timeout=20)
        self.http.close()
        super().tearDown()

    async def raw(self, path: str, body: bytes | None = None, method: str = "POST",
                  **kwargs) -> tornado.httpclient.HTTPResponse:
        return await self.http.fetch(self.double.url + path, method=method, body=body,
                                     raise_error=False, request_timeout=20,
                                     allow_nonstandard_methods=True, **kwargs)

    async def chat_error(self, model: str, stream: bool) -> "ollama.ResponseError":
        """The ResponseError the official client raises for this chat (streamed: on iterating)."""
        with pytest.raises(ollama.ResponseError) as caught:
            result = await self.client.chat(model=model, messages=MESSAGES, stream=stream)
            if stream:
                async for _ in result:
                    pass
        return caught.value

    @gen_test(timeout=30)
    async def test_unknown_model_is_404(self) -> None:
        for stream in (False, True):
            error = await self.chat_error("nope", stream)
            assert error.status_code == 404
            assert error.error == "model 'nope' not found"
        response = await self.raw("/api/chat", json.dumps({"model": "nope"}).encode())
        assert response.code == 404 and response.body == b'{"error":"model \'nope\' not found"}'
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"

    @gen_test(timeout=30)
    async def test_async_stream_and_recorded_request(self) -> None:
        messages = MESSAGES + [{"role": "assistant", "content": "  Earlier\n\nanswer "},
                               {"role": "user", "content": "Again \u00e9  "}]
        stream = await self.client.chat(model="qwen3:8b", messages=messages, stream=True,
                                        options={"temperature": 0.5, "num_ctx": 4096})
        parts = [part async for part in stream]
        assert "".join(p.message.content for p in parts) == default_reply(messages)
        assert parts[-1].done and parts[-1].eval_count == len(parts) - 1

        await self.raw("/", method="GET")
        (recorded,) = self.double.chat_requests()
        assert len(self.double.requests) == 2 and self.double.requests[1].method == "GET"
        assert recorded.body is not None and recorded.body["messages"] == messages
        assert recorded.body["model"] == "qwen3:8b" and recorded.body["stream"] is True
        assert recorded.body["options"] == {"temperature": 0.5, "num_ctx": 4096}
        assert json.loads(recorded.raw) == recorded.body
        assert recorded.chunks_sent == len(parts) - 1
        assert recorded.received_at <= recorded.first_byte_at <= recorded.finished_at
        assert recorded.closed_at is None and not recorded.closed.is_set()

    @gen_test(timeout=30)
    async def test_mid_stream_error(self) -> None:
        message = "an error was encountered while running the model: boom"
        self.double.behave("llama3.2", error=message, error_after=2)
        contents = []
        with pytest.raises(ollama.ResponseError) as caught:
            async for part in await self.client.chat(model="llama3.2", messages=MESSAGES, stream=True):
                contents.append(part.message.content)
        assert caught.value.error == message and caught.value.status_code == -1
        assert contents == split_tokens(default_reply(MESSAGES))[:2]

        response = await self.raw("/api/chat", json.dumps({"model": "llama3.2"}).encode())
        assert response.code == 200
        error_line = json.dumps({"error": message}, separators=(",", ":")).encode()
        assert response.body.splitlines()[-1] == error_line

    @gen_test(timeout=30)
    async def test_status_error_before_output(self) -> None:
        busy = "server busy, please try again.  maximum pending requests exceeded"
        self.double.behave("gemma3:12b", status=503, error=busy)
        for stream in (False, True):
            error = await self.chat_error("gemma3:12b", stream)
            assert error.status_code == 503 and error.error == busy

    @gen_test(timeout=30)
    async def test_raw_stream_bytes_and_header_delay(self) -> None:
        delay = 0.3
        self.double.behave("tinyllama", header_delay=delay, token_delay=0.001)
        header_times: list[float] = []
        body = json.dumps({"model": "tinyllama", "messages": MESSAGES}).encode()  # no "stream" key
        start = time.monotonic()
        response = await self.raw("/api/chat", body,
                                  header_callback=lambda line: header_times.append(time.monotonic()))
        assert response.code == 200
        assert header_times[0] - start >= 0.8 * delay
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert response.headers["Transfer-Encoding"] == "chunked"
        recorded = self.double.chat_requests()[0]
        assert recorded.first_byte_at - recorded.received_at >= 0.8 * delay

        raw = response.body
        assert raw.endswith(b"}\n") and b"\n\n" not in raw and not raw.startswith(b"\n")
        assert b"<" not in raw and b"\\u003ctag\\u003e" in raw and b"\\u0026" in raw
        lines = [json.loads(line) for line in raw.split(b"\n")[:-1]]
        for line in lines[:-1]:
            assert list(line) == CHUNK_KEYS and list(line["message"]) == ["role", "content"]
            assert line["model"] == "tinyllama" and line["done"] is False
            assert CREATED_AT.match(line["created_at"]), line["created_at"]
        final = lines[-1]
        assert list(final) == FINAL_KEYS and final["message"] == {"role": "assistant", "content": ""}
        assert all(isinstance(final[k], int) and final[k] > 0 for k in FINAL_KEYS[5:])
        assert final["load_duration"] >= delay * 1e9 and final["eval_count"] == len(lines) - 1
        assert "".join(line["message"]["content"] for line in lines) == default_reply(MESSAGES)

    @gen_test(timeout=30)
    async def test_non_streaming_body(self) -> None:
        body = json.dumps({"model": "llama3.2:latest", "messages": MESSAGES, "stream": False})
        response = await self.raw("/api/chat", body.encode())
        assert response.code == 200 and not response.body.endswith(b"\n")
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        obj = json.loads(response.body)
        assert list(obj) == FINAL_KEYS and obj["model"] == "llama3.2:latest"
        assert obj["message"]["content"] == default_reply(MESSAGES)

        body = json.dumps({"model": "llama3.2", "prompt": "x <y>", "stream": False})
        obj = json.loads((await self.raw("/api/generate", body.encode())).body)
        assert list(obj)[:4] == ["model", "created_at", "response", "done"] and obj["done"]

    @gen_test(timeout=30)
    async def test_request_errors(self) -> None:
        cases = [
            ("POST", "/api/chat", b"", 400, {"error": "missing request body"}),
            ("POST", "/api/chat", b"{}", 400, {"error": "model is required"}),
            ("POST", "/api/chat", b'{"model":""}', 400, {"error": "model is required"}),
            ("POST", "/api/generate", b"{}", 404, {"error": "model '' not found"}),
            ("POST", "/api/generate", b'{"model":"Nope:1b"}', 404, {"error": "model 'Nope:1b' not found"}),
        ]
        for method, path, body, status, expected in cases:
            response = await self.raw(path, body, method=method)
            assert (response.code, json.loads(response.body)) == (status, expected), (path, body)
            assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        response = await self.raw("/api/chat", b"{not json")
        assert response.code == 400
        assert json.loads(response.body)["error"].startswith("invalid character 'n'")

        response = await self.raw("/api/nothing", method="GET")
        assert (response.code, response.body) == (404, b"404 page not found")
        response = await self.raw("/api/chat", method="GET")
        assert (response.code, response.body) == (405, b"405 method not allowed")
        response = await self.raw("/", method="GET")
        assert (response.code, response.body) == (200, b"Ollama is running")
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        response = await self.raw("/", method="HEAD")
        assert (response.code, response.headers["Content-Length"]) == (200, "17")
        listed = await self.client.list()
        assert {m.model for m in listed.models} >= {"llama3.2:latest", "qwen3:8b", "tinyllama:latest"}

    @gen_test(timeout=30)
    async def test_stall_then_client_closes(self) -> None:
        self.double.behave("llama3.2", stall_after=2)
        stream = await self.client.chat(model="llama3.2", messages=MESSAGES, stream=True)
        received = [await stream.__anext__(), await stream.__anext__()]
        assert [p.message.content for p in received] == split_tokens(default_reply(MESSAGES))[:2]
        recorded = self.double.chat_requests()[0]
        assert not recorded.closed.is_set()
        await stream.aclose()  # closes the HTTP response, so the socket
        await asyncio.wait_for(recorded.closed.wait(), timeout=10)
        assert recorded.closed_at is not None and recorded.finished_at is None
        assert recorded.chunks_sent == 2

    @gen_test(timeout=30)
    async def test_reset_mid_stream(self) -> None:
        self.double.behave("llama3.2", reset_after=3)
        received = []
        with pytest.raises(httpx.ReadError):  # ECONNRESET: unread data may be discarded too
            async for part in await self.client.chat(model="llama3.2", messages=MESSAGES, stream=True):
                received.append(part)
        assert len(received) <= 3 and self.double.chat_requests()[0].chunks_sent == 3

    @gen_test(timeout=30)
    async def test_close_mid_stream(self) -> None:
        self.double.behave("llama3.2", close_after=1)
        received = []
        with pytest.raises(httpx.RemoteProtocolError):
            async for part in await self.client.chat(model="llama3.2", messages=MESSAGES, stream=True):
                received.append(part)
        assert len(received) == 1

    @gen_test(timeout=30)
    async def test_tool_calls_whole_in_one_line_accepted_by_the_official_client(self) -> None:
        weather = {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather at a place",
            "parameters": {"type": "object", "required": ["lat", "lon"],
                           "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}}}
        calls = [tool_call("get_weather", lat=42.28, lon=-83.74),
                 {"id": "call_k3x9a0bq", "function": {"index": 1, "name": "get_location",
                                                      "arguments": {}}}]
        self.double.behave("llama3.2", tool_calls=calls)
        ask = [{"role": "user", "content": "Weather here?"}]
        parts = [p async for p in await self.client.chat(model="llama3.2", messages=ask,
                                                         tools=[weather], stream=True)]
        # One line with the calls (content ""), then the done line; nothing else.
        lines = self.double.chat_requests()[0].lines_sent
        assert len(parts) == len(lines) == 2 and parts[1].done and not parts[0].done
        assert json.loads(lines[0])["message"] == {"role": "assistant", "content": "",
                                                   "tool_calls": calls}
        got = parts[0].message.tool_calls
        assert [(c.function.name, dict(c.function.arguments)) for c in got] == \
            [("get_weather", {"lat": 42.28, "lon": -83.74}), ("get_location", {})]
        assert self.double.chat_requests()[0].body["tools"] == [weather]
        # Non-streaming: the calls in the one object.
        whole = await self.client.chat(model="llama3.2", messages=ask, stream=False)
        assert [c.function.name for c in whole.message.tool_calls] == ["get_weather", "get_location"]
        # Once the conversation ends with the tool's result, the model answers in text.
        ask += [{"role": "assistant", "content": "", "tool_calls": calls[:1]},
                {"role": "tool", "content": "12 °C", "tool_name": "get_weather"}]
        parts = [p async for p in await self.client.chat(model="llama3.2", messages=ask, stream=True)]
        assert "".join(p.message.content for p in parts) == default_reply(ask)
        assert not any(p.message.tool_calls for p in parts)

    @gen_test(timeout=30)
    async def test_omit_done_and_custom_reply(self) -> None:
        self.double.behave("llama3.2", reply="a  b\n", omit_done=True)
        parts = [p async for p in await self.client.chat(model="llama3.2", messages=MESSAGES, stream=True)]
        assert [p.message.content for p in parts] == ["a", "  b", "\n"]
        assert not any(p.done for p in parts)

    @gen_test(timeout=30)
    async def test_stop_with_stalled_stream(self) -> None:
        double = OllamaDouble(default=Behavior(stall_after=1), accept_any_model=True)
        double.listen()
        first_line = asyncio.get_running_loop().create_future()

        async def call() -> None:
            async with httpx.AsyncClient() as client:
                async with client.stream("POST", f"{double.url}/api/chat", json={"model": "m"}) as r:
                    async for line in r.aiter_lines():
                        first_line.set_result(line)

        task = asyncio.ensure_future(call())
        assert json.loads(await asyncio.wait_for(first_line, timeout=10))["done"] is False
        await asyncio.wait_for(double.stop(), timeout=10)
        with pytest.raises(httpx.TransportError):  # cut off mid-body, not a clean end
            await asyncio.wait_for(task, timeout=10)
        assert not double.requests[0].closed.is_set()  # the double closed it, not the peer

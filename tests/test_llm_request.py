"""The request validator: every value of the body, at any depth, is checked before anything
is stored or sent, and the rejection names the field.  The bodies are JSON text, decoded
as chatterd decodes them, because the hostile values (NaN, 1e400, "\\ud800") exist only
in the text."""

import asyncio

import pytest
from tornado.testing import gen_test

import jsonfmt
from handlers.validation import ClientError, check_json
from handlers.llm_request import parse_llm_request
from tests.support import ChatterdTestCase, chat_body, streams_finished

MESSAGE = '{"role": "user", "content": "hi"}'


def body(model='"llama3.2"', messages=f"[{MESSAGE}]", extra=""):
    """A valid /llmchat body as JSON text, with one part replaced by hostile text."""
    return (f'{{"appID": "a", "model": {model}, "messages": {messages}, "stream": true'
            f'{", " + extra if extra else ""}}}')


def rejection(text, **kwargs):
    with pytest.raises(ClientError) as caught:
        parse_llm_request(jsonfmt.loads(text), **{"max_messages": 1000, **kwargs})
    return caught.value.status_code, caught.value.message


def deep(levels, leaf="1"):
    return "[" * levels + leaf + "]" * levels


@pytest.mark.parametrize("text, message", [
    # model
    (body(model='"llama\\u0000"'), "model contains a NUL character"),
    (body(model='"llama\\ud800"'), "model is not valid Unicode (lone surrogate)"),
    (body(model='"' + "m" * 201 + '"'), "model is longer than 200 characters"),
    (body(model='" "'), "model is required and must be a non-empty string"),
    (body(model="7"), "model is required and must be a non-empty string"),
    # passthrough fields, at any depth, keys too
    (body(extra='"options": {"stop": ["a", "b\\u0000"]}'), "options.stop[1] contains a NUL character"),
    (body(extra='"format": {"properties": {"x": {"type": "\\udc00"}}}'),
     "format.properties.x.type is not valid Unicode"),
    (body(extra='"tools": [{"function": {"name\\u0000": 1}}]'),
     'tools[0].function has a key "name\\u0000" that contains a NUL character'),
    (body(extra='"opt\\ud83d": 1'), 'the body has a key "opt\\ud83d" that is not valid Unicode'),
    (body(extra='"options": {"a b": "\\u0000"}'), 'options["a b"] contains a NUL character'),
    # message extras
    (body(messages='[{"role": "user", "content": "x"}, {"role": "user", "content": "y"},'
                   ' {"role": "user", "content": "z", "images": ["\\u0000"]}]'),
     "messages[2].images[0] contains a NUL character"),
    (body(messages='[{"role": "assistant", "content": "", "tool_calls": [{"function":'
                   ' {"name": "f", "arguments": {"q": "\\ud800"}}}]}]'),
     "messages[0].tool_calls[0].function.arguments.q is not valid Unicode"),
    (body(messages='[{"role": "tool", "content": "x", "tool_name": "\\u0000"}]'),
     "messages[0].tool_name contains a NUL character"),
    (body(messages='[{"role": "assistant", "content": "x", "thinking": "\\udfff"}]'),
     "messages[0].thinking is not valid Unicode"),
    (body(messages='[{"role": "user", "content": "x", "whatever": {"k": ["\\u0000"]}}]'),
     "messages[0].whatever.k[0] contains a NUL character"),
    # role
    (body(messages='[{"role": NaN, "content": "x"}]'), "messages[0].role is NaN or Infinity"),
    (body(messages='[{"role": 1, "content": "x"}]'), "messages[0].role must be a string"),
    (body(messages='[{"role": ["user"], "content": "x"}]'), "messages[0].role must be a string"),
    (body(messages='[{"role": "robot' + "t" * 10000 + '", "content": "x"}]'),
     'messages[0].role must be one of system, user, assistant, tool, not "robot'),
    # numbers
    (body(extra='"options": {"temperature": NaN}'), "options.temperature is NaN"),
    (body(extra='"options": {"temperature": Infinity}'), "options.temperature is NaN or Infinity"),
    (body(extra='"options": {"temperature": -Infinity}'), "options.temperature is NaN or Infinity"),
    (body(extra='"options": {"temperature": 1e400}'), "like 1e400"),
    (body(extra='"options": {"seed": 9223372036854775808}'),
     "options.seed is an integer outside the 64-bit range"),
    (body(extra='"options": {"seed": -9223372036854775809}'), "options.seed is an integer outside"),
    (body(extra='"keep_alive": 123456789012345678901234567890'), "keep_alive is an integer outside"),
    # nesting
    (body(extra=f'"format": {deep(64)}'), "format" + "[0]" * 63 + " is nested more than 64 levels deep"),
    (body(messages=f'[{{"role": "user", "content": "x", "images": {deep(70)}}}]'),
     "is nested more than 64 levels deep"),
])
def test_hostile_values_are_422_naming_the_field(text, message):
    status, error = rejection(text)
    assert status == 422
    assert message in error
    assert len(error) < 400  # a short prefix is quoted, never the whole value
    error.encode("utf-8")  # the message itself can always be sent


@pytest.mark.parametrize("text", [
    body(extra='"options": {"temperature": 1e308, "seed": 9223372036854775807, "x": -9223372036854775808}'),
    body(extra='"options": {"tiny": 1e-400, "stop": ["\\ud83d\\ude00", "é", "\\u2028"]}'),  # a real pair
    body(extra=f'"format": {deep(63)}'),  # the body is level 1, so 63 arrays is the deepest allowed
    body(model='"' + "m" * 200 + '"'),
])
def test_edge_values_that_are_fine(text):
    assert parse_llm_request(jsonfmt.loads(text), max_messages=1000).model


def test_message_count_is_capped():
    messages = "[" + ", ".join([MESSAGE] * 6) + "]"
    assert rejection(body(messages=messages), max_messages=5) == \
        (422, "messages holds 6 entries; the limit is 5")
    assert len(parse_llm_request(jsonfmt.loads(body(messages=messages)), max_messages=6).messages) == 6


def test_check_json_names_the_first_bad_value_only_by_path():
    with pytest.raises(ClientError) as caught:
        check_json({"name": "a", "extra": [{"deep": float("nan")}]})
    assert caught.value.message.startswith("extra[0].deep is NaN")
    long_key = "k\x00" + "y" * 100
    with pytest.raises(ClientError) as caught:
        check_json({"o": {long_key: 1}})
    assert caught.value.message == f'o has a key "k\\u0000{"y" * 38}"… that contains a NUL character, ' \
                                   "which cannot be stored"


class ValidationOverHTTPTest(ChatterdTestCase):
    settings_overrides = {"max_messages": 3}

    def assert_rejected(self, path, text, status, fragment):
        response = self.post_json(path, text)
        self.assertEqual(response.code, status, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertIn(fragment, jsonfmt.loads(response.body)["error"])

    def test_each_endpoint_refuses_hostile_values_and_stores_nothing(self):
        with self.assertNoLogs(level="ERROR"):
            for path in ("/llmchat", "/llmprep"):
                self.assert_rejected(path, body(model='"m\\u0000"'), 422, "model contains a NUL")
                self.assert_rejected(path, body(messages='[{"role": NaN, "content": "x"}]'), 422,
                                     "messages[0].role")
                self.assert_rejected(path, body(extra='"options": {"num_ctx": 1e400}'), 422,
                                     "options.num_ctx")
                self.assert_rejected(path, body(messages="[" + ", ".join([MESSAGE] * 4) + "]"), 422,
                                     "messages holds 4 entries; the limit is 3")
            self.assert_rejected("/llmprompt", '{"model": "m", "prompt": "\\ud800"}', 422, "prompt")
            self.assert_rejected("/llmprompt", '{"model": "m", "options": {"seed": 1e400}}', 422,
                                 "options.seed")
            self.assert_rejected("/postchatt", '{"name": "n", "message": "m", "x": [NaN]}', 422, "x[0]")
            self.assert_rejected("/postchatt", '{"name": "n\\udc00", "message": "m"}', 422, "name")
        self.assertEqual(self.rows("a"), [])
        self.assertEqual(jsonfmt.loads(self.fetch("/getchatts").body), [])
        self.assertEqual(self.double.requests, [])

    def test_the_message_limit_counts_what_is_sent(self):
        self.assertEqual(self.post_json("/llmprep", body(messages="[" + ", ".join([MESSAGE] * 3) + "]")).code,
                         200)
        self.assertEqual(len(self.rows("a")), 3)

    @gen_test(timeout=20)
    async def test_bad_content_length_is_400_with_json(self):
        cases = [b"\xc2\xb2", b"9" * 5000, b"1" + b"0" * 18, b"-1", b"", b"0x10", b"5, 5",
                 b"\xd9\xa1"]  # Arabic-Indic 1: str.isdigit() and int() both accept it
        with self.assertNoLogs(level="ERROR"):
            for value in cases:
                for path in (b"/llmchat", b"/llmprep", b"/llmprompt", b"/postchatt"):
                    status, headers, payload = await raw_request(
                        self.get_http_port(), b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: " + value + b"\r\n\r\n{}")
                    self.assertEqual(status, 400, (path, value))
                    self.assertEqual(jsonfmt.loads(payload), {"error": "invalid Content-Length header"})

    @gen_test(timeout=20)
    async def test_bad_transfer_encoding_is_400_with_json(self):
        for extra in (b"Transfer-Encoding: gzip\r\n", b"Transfer-Encoding: chunked, chunked\r\n",
                      b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"):
            status, _, payload = await raw_request(
                self.get_http_port(), b"POST /llmchat HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n{}")
            self.assertEqual(status, 400, extra)
            self.assertIn("Transfer-Encoding", jsonfmt.loads(payload)["error"])

    @gen_test(timeout=20)
    async def test_a_client_leaving_mid_body_is_not_waited_for(self):
        # Tornado never calls post() nor finish() then; a graceful shutdown must not wait for it.
        reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
        writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"appID\"")
        await writer.drain()
        while not self._app.in_flight:
            await asyncio.sleep(0.01)
        writer.transport.abort()
        await streams_finished(self._app, 5)

    def test_a_valid_chat_still_works(self):
        response = self.post_json("/llmchat", chat_body("a", "hi", options={"seed": 42, "temperature": 0.5}))
        self.assertEqual(response.code, 200)
        # The client's options go through; chatterd adds its context size (docs/turn-contract.md, the context budget).
        self.assertEqual(self.double.chat_requests()[0].body["options"],
                         {"seed": 42, "temperature": 0.5, "num_ctx": 8192})


async def raw_request(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send *request* bytes; return (status, headers, body) of the answer, read by its
    Content-Length (the connection may stay open) or until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if "content-length" in headers:
            payload = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
        else:
            payload = await asyncio.wait_for(reader.read(), timeout)
        return int(status_line.split(" ")[1]), headers, payload
    finally:
        writer.transport.abort()

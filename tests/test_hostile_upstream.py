"""An upstream that misbehaves cannot break the client's framing or hold a turn forever.

Each case runs the Ollama double with a hostile Behavior and checks what the client
sees: the status, the events (with the strict tests/sse_parser.py), the raw bytes
(every line is `data: `, `event: `, a `: ` comment or empty; nothing an SSE or JavaScript
parser would take as a line end inside a line), what is stored, and that nothing is
logged at ERROR.  Nothing sleeps to wait for an outcome.
"""

import asyncio
import json
import logging
import re
import socket
import time

from tornado.testing import gen_test

import jsonfmt
from tests.ollama_double import split_tokens
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_body, streams_finished

LINE_END = re.compile(rb"\r\n|\r|\n")
# Line terminators of JavaScript (U+2028/9) and of Python's str.splitlines beyond CR/LF.
OTHER_BREAKS = ("\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85")


class HostileCase(ChatterdTestCase):
    def chat(self, model, app_id="hostile"):
        """POST a streaming chat; return (response, events), the body checked line by line."""
        with self.assertNoLogs(level=logging.ERROR):
            response = self.post_json("/llmchat", chat_body(app_id, "hi", model=model))
            self.io_loop.run_sync(lambda: streams_finished(self._app))
        if response.code != 200:
            return response, []
        body = response.body
        for line in LINE_END.split(body):
            self.assertTrue(line == b"" or line.startswith((b"data: ", b"event: ", b": "))
                            or re.fullmatch(rb"id: %s:\d+" % response.headers["X-Chatterd-Turn"]
                                            .encode(), line),
                            f"a line the framing did not make: {line[:80]!r}")
            self.assertTrue(not line.startswith(b"event: ") or line == b"event: error",
                            f"forged event: {line!r}")
        self.assertNotIn(b"\r", body)
        text = body.decode("utf-8")
        for char in OTHER_BREAKS:
            self.assertNotIn(char, text)
        self.assertFalse(any(ord(c) < 0x20 and c != "\n" for c in text), "raw control character")
        events, _ = parse(body)
        for event in events:
            json.loads(event.data)  # strict: no raw control characters in strings
        return response, events

    def content(self, events):
        return "".join(json.loads(e.data)["message"]["content"]
                       for e in events if e.event == "message")

    def stored_reply(self, app_id="hostile"):
        """The reply row of the appID's one turn (of a turn that ended before any answer
        text too, which is a record outside the conversation)."""
        rows = self.io_loop.run_sync(lambda: self.pool.fetch(
            "SELECT * FROM messages WHERE appid = $1 AND role = 'assistant'", app_id))
        self.assertEqual(len(rows), 1, rows)
        return rows[0]


class HostileBytesTest(HostileCase):
    def assert_relayed_verbatim(self, model, reply):
        response, events = self.chat(model)
        self.assertEqual(response.code, 200)
        self.assertEqual([e.event for e in events], ["message"] * (len(split_tokens(reply)) + 1))
        self.assertTrue(json.loads(events[-1].data)["done"])
        self.assertEqual(self.content(events), reply)
        row = self.stored_reply()
        self.assertEqual((row["content"], row["status"]), (reply, "complete"))

    def test_raw_cr_in_content_cannot_forge_an_event(self):
        reply = "Hi\revent: error\rdata: {\"forged\": true}\r\rafter\r\n"
        self.double.behave("cr", reply=reply, raw_chars="\r")
        self.assert_relayed_verbatim("cr", reply)
        self.assertTrue(any(b"\r" in line for line in self.double.chat_requests()[0].lines_sent))

    def test_llmprompt_ndjson_lines_are_not_split(self):
        reply = "Hi\rthere\u2028you\x0b!"
        self.double.behave("crgen", reply=reply, raw_chars="\r\u2028\x0b")
        with self.assertNoLogs(level=logging.ERROR):
            response = self.post_json("/llmprompt", {"model": "crgen", "prompt": "x"})
        self.assertEqual(response.code, 200)
        lines = response.body.decode("utf-8").split("\n")
        self.assertEqual(lines.pop(), "")
        self.assertEqual(len(lines), len(split_tokens(reply)) + 1)
        self.assertEqual(lines, response.body.decode("utf-8").splitlines())  # no other breaks
        self.assertEqual("".join(json.loads(line)["response"] for line in lines), reply)

    def test_raw_line_and_paragraph_separators_are_escaped(self):
        reply = "one\u2028two\u2029three \u2028"
        self.double.behave("ls", reply=reply, raw_chars="\u2028\u2029")
        self.assert_relayed_verbatim("ls", reply)
        self.assertTrue(any("\u2028".encode() in line
                            for line in self.double.chat_requests()[0].lines_sent))

    def test_other_raw_control_characters_are_escaped(self):
        reply = "tab\there\x0bvt\x0cff\x1crs\x1f!"
        self.double.behave("ctl", reply=reply, raw_chars="\t\x0b\x0c\x1c\x1f")
        self.assert_relayed_verbatim("ctl", reply)

    def test_raw_nul_is_escaped_in_the_relay(self):
        # Storing a NUL is handled separately (test_nul_in_content_is_stored_without_it);
        # here only the relayed events count.
        reply = "nul\x00here done"
        self.double.behave("rawnul", reply=reply, raw_chars="\x00")
        response, events = self.chat("rawnul")
        self.assertEqual(response.code, 200)
        self.assertIn(b"\x00", self.double.chat_requests()[0].lines_sent[0])
        messages = [e for e in events if e.event == "message"]
        self.assertEqual(len(messages), len(split_tokens(reply)) + 1)
        self.assertEqual(self.content(messages), reply)


class HostileStatusTest(HostileCase):
    def assert_refused(self, model, status, message):
        response, _ = self.chat(model)
        self.assertEqual(response.code, status, response.body)
        self.assertEqual(jsonfmt.loads(response.body), {"error": message})
        self.assertEqual(self.rows("hostile"), [])  # the turn did not happen

    def test_early_hints_before_200_are_skipped(self):
        self.double.behave("hints", interim=103)
        response, events = self.chat("hints")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Content-Type"], "text/event-stream")
        self.assertTrue(json.loads(events[-1].data)["done"])
        row = self.stored_reply()
        self.assertEqual((row["content"], row["status"]), (self.content(events), "complete"))

    def test_204_is_a_clear_502(self):
        self.double.behave("empty", status=204)
        self.assert_refused("empty", 502, "Ollama answered 204 No Content, expected 200")

    def test_other_2xx_is_a_clear_502(self):
        self.double.behave("created", status=201)
        self.assert_refused("created", 502, "Ollama answered 201 Created, expected 200")

    def test_redirects_are_not_followed(self):
        for status, reason in ((301, "Moved Permanently"), (302, "Found"), (307, "Temporary Redirect")):
            with self.subTest(status=status):
                self.double.behave(f"moved{status}", status=status, location="/")
                self.assert_refused(f"moved{status}", 502, f"Ollama answered {status} {reason} "
                                                          f"(redirect to /), expected 200")
        # Followed, GET / would have answered 200 "Ollama is running".
        self.assertEqual([r.path for r in self.double.requests], ["/api/chat"] * 3)

    def test_4xx_and_5xx_still_pass_through(self):
        self.double.behave("busy", status=503, error="server busy")
        self.assert_refused("busy", 503, "Ollama: server busy")


class LateStatusTest(HostileCase):
    """The status comes after --status-grace: the stream is already committed to 200."""

    settings_overrides = {"status_grace": 0.1}

    def test_late_204_ends_the_stream_with_an_error_event(self):
        self.double.behave("late", status=204, header_delay=0.5)
        response, events = self.chat("late")
        self.assertEqual(response.code, 200)
        self.assertEqual([e.event for e in events], ["error"])
        self.assertEqual(json.loads(events[0].data),
                         {"error": "Ollama answered 204 No Content, expected 200"})
        self.assertEqual(self.stored_reply()["status"], "failed")
        self.assertEqual(self.rows("hostile"), [])  # no answer text: outside the conversation


class OddFieldsTest(HostileCase):
    """Well-formed JSON of the wrong shape: relayed, tolerated, and the turn still stored."""

    def assert_turn_ends_cleanly(self, model):
        response, events = self.chat(model)  # framing checked, no ERROR logged
        self.assertEqual(response.code, 200)
        self.assertTrue(events)
        last = events[-1]
        self.assertTrue(last.event == "error" or json.loads(last.data).get("done"), last)
        row = self.stored_reply()
        self.assertIsInstance(row["content"], str)
        return events, row

    def test_non_string_content(self):
        self.double.behave("numbers", reply="a b c", content_value=lambda piece: 42)
        self.assert_turn_ends_cleanly("numbers")

    def test_list_content(self):
        self.double.behave("lists", reply="a b c", content_value=lambda piece: [piece])
        self.assert_turn_ends_cleanly("lists")

    def test_negative_eval_count(self):
        self.double.behave("negative", reply="a b c", eval_count=-5)
        events, row = self.assert_turn_ends_cleanly("negative")
        self.assertEqual((row["content"], row["status"]), ("a b c", "complete"))
        self.assertFalse(row["tokens"] is not None and row["tokens"] < 0)

    def test_string_eval_count(self):
        self.double.behave("stringy", reply="a b c", eval_count="3")
        events, row = self.assert_turn_ends_cleanly("stringy")
        self.assertEqual([e.event for e in events], ["message"] * 4)
        self.assertEqual((row["content"], row["status"]), ("a b c", "complete"))

    def test_nul_in_content_is_stored_without_it(self):
        reply = "nul\x00here done"  # Ollama escapes it: \u0000 in the JSON string
        self.double.behave("nul", reply=reply)
        events, row = self.assert_turn_ends_cleanly("nul")
        self.assertEqual([e.event for e in events], ["message"] * (len(split_tokens(reply)) + 1))
        self.assertEqual(self.content(events), reply)  # relayed as Ollama sent it
        self.assertEqual(row["status"], "complete")
        self.assertNotIn("\x00", row["content"])
        self.assertEqual(row["content"].replace("\ufffd", ""), reply.replace("\x00", ""))


class WriteTimeoutTest(ChatterdTestCase):
    settings_overrides = {"write_timeout": 1.0}

    @gen_test(timeout=30)
    async def test_a_client_that_stops_reading_is_cut_off(self):
        reply = ("x" * 4000 + " ") * 5000  # 20 MB as fast as the socket takes it
        self.double.behave("flood", reply=reply)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.get_http_port()))
        reader, writer = await asyncio.open_connection(sock=sock)
        payload = jsonfmt.dumpb(chat_body("stalled", "go", model="flood"))
        writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()
        try:
            (chat,) = await self.double.wait_for_chats(1)
            # Never read.  The buffers fill within a fraction of a second; then chatterd's
            # flush waits, the write timeout cuts the client off and ends the Ollama call.
            await asyncio.wait_for(chat.closed.wait(), self.config.write_timeout + 10)
            self.assertLess(chat.closed_at - chat.received_at, self.config.write_timeout + 5)
            self.assertLess(chat.chunks_sent, 5000)  # cut short, not finished
            await streams_finished(self._app)
            row = (await self.conversation("stalled"))[-1]
            self.assertEqual((row["role"], row["status"]), ("assistant", "interrupted"))
            # chatterd closed the client's connection: what was buffered, then EOF.
            deadline = time.monotonic() + 10
            while await asyncio.wait_for(reader.read(1 << 20), deadline - time.monotonic()):
                pass
        finally:
            writer.transport.abort()

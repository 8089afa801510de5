"""runtime/lean_streams.py: IOStreams whose write queues are short lists, not 600-byte deques."""

import asyncio
import socket

from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream, StreamClosedError
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import AsyncTestCase, bind_unused_port, gen_test
from tornado.web import Application, RequestHandler

import upstreams.http
from runtime.accept_guard import GuardedHTTPServer

from runtime.lean_streams import SENT_HEADERS, SentHeaders, ShortQueue, empty_in_place, lighten
from tests.support import ChatterdTestCase, chat_body


class LightenedStreamTest(AsyncTestCase):
    @gen_test
    async def test_writes_queue_and_complete_in_order_when_the_peer_lags(self) -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        stream = lighten(IOStream(ours))
        self.assertIsInstance(stream._write_futures, ShortQueue)
        self.assertIsInstance(stream._write_buffer._buffers, ShortQueue)
        sent = []
        futures = []
        for i in range(200):  # far more than the socket buffers take: writes queue up
            piece = bytes([65 + i % 26]) * 20000
            sent.append(piece)
            futures.append(stream.write(piece))
        self.assertFalse(futures[-1].done())
        received = bytearray()
        loop = asyncio.get_running_loop()
        while len(received) < 200 * 20000:  # each recv waits until the socket is readable
            received += await loop.sock_recv(theirs, 1 << 20)
        await asyncio.gather(*futures)
        self.assertEqual(bytes(received), b"".join(sent))
        self.assertEqual(len(stream._write_futures), 0)
        stream.close()
        theirs.close()

    @gen_test
    async def test_a_close_fails_the_queued_writes(self) -> None:
        ours, theirs = socket.socketpair()
        stream = lighten(IOStream(ours))
        futures = [stream.write(b"x" * 1_000_000) for _ in range(3)]
        theirs.close()
        stream.close()
        results = await asyncio.gather(*futures, return_exceptions=True)
        self.assertIsInstance(results[-1], StreamClosedError)  # not left pending forever
        self.assertEqual(len(stream._write_futures), 0)


class ChatStreamsAreLightenedTest(ChatterdTestCase):
    def test_the_upstream_connection_uses_short_queues(self) -> None:
        seen = []

        def spy(stream):  # type: ignore[no-untyped-def]
            seen.append(stream)
            return lighten(stream)

        upstreams.http.lean_streams.lighten = spy
        try:
            response = self.post_json("/llmchat", chat_body("lean", "hi"))
        finally:
            upstreams.http.lean_streams.lighten = lighten
        self.assertEqual(response.code, 200)
        self.assertEqual(len(seen), 1)
        self.assertIsInstance(seen[0]._write_futures, ShortQueue)


class ServerStreamsAreLightenedTest(AsyncTestCase):
    @gen_test
    async def test_chatterds_server_gives_handlers_lightened_streams(self) -> None:
        seen = []

        class Probe(RequestHandler):
            def get(self) -> None:
                seen.append(type(self.request.connection.stream._write_futures))
                self.write("ok")

        server = GuardedHTTPServer(Application([("/", Probe)]))
        sock, port = bind_unused_port()
        server.add_sockets([sock])
        try:
            response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/")
        finally:
            server.stop()
        self.assertEqual(response.body, b"ok")
        self.assertEqual(seen, [ShortQueue])


class SharedInstanceDictsTest(ChatterdTestCase):
    """An upstream stream and its request keep instance dictionaries CPython shares between
    instances (1.3 KB less each per open stream than private ones): chatterd's own state on
    them is one attribute (StreamState) or a slot (UpstreamRequest)."""

    def test_the_upstream_stream_and_request_of_a_streaming_turn(self) -> None:
        import sys
        self.double.behave("slow", reply="a b c d e f", token_delay=0.05)
        seen = {}
        original = upstreams.http.AbortableConnection._create_connection

        def spy(connection, stream):  # type: ignore[no-untyped-def]
            made = original(connection, stream)
            seen["stream"], seen["request"] = stream, connection.request.request
            return made

        upstreams.http.AbortableConnection._create_connection = spy
        try:
            response = self.post_json("/llmchat", chat_body("dicts", "hi", model="slow"))
        finally:
            upstreams.http.AbortableConnection._create_connection = original
        self.assertEqual(response.code, 200)
        ours, theirs = socket.socketpair()
        plain = IOStream(ours)
        self.assertEqual(sys.getsizeof(vars(seen["stream"])), sys.getsizeof(vars(plain)))
        self.assertIsInstance(seen["request"], upstreams.http.UpstreamRequest)
        self.assertEqual(vars(seen["request"]), {})  # every attribute in a slot
        plain.close()
        theirs.close()

    def test_a_chat_handler_after_requests_of_every_kind(self) -> None:
        # A type's shared keys are the union of the attributes its instances ever got: once
        # requests that failed, answered whole or streamed have run, a streaming handler must
        # still fit (else each open stream carries a private dictionary, 0.5 KiB more).
        import sys
        from handlers.chat import LLMChatHandler
        self.double.behave("slow", reply="a b c d e f", token_delay=0.02)
        for body in ({"appID": "dicts-h"}, chat_body("dicts-h", "once", stream=False),
                     chat_body("dicts-h", "stream", model="slow")):
            self.post_json("/llmchat", body)
        seen = []
        original = LLMChatHandler._finish_turn

        async def spy(handler):  # type: ignore[no-untyped-def]
            seen.append(vars(handler))
            return await original(handler)

        LLMChatHandler._finish_turn = spy  # type: ignore[method-assign]
        try:
            response = self.post_json("/llmchat", chat_body("dicts-h", "again", model="slow"))
        finally:
            LLMChatHandler._finish_turn = original  # type: ignore[method-assign]
        self.assertEqual(response.code, 200)
        # A shared (split) dictionary is smaller than an ordinary one with the same items.
        self.assertLess(sys.getsizeof(seen[0]), sys.getsizeof(dict(seen[0])), list(seen[0]))


class WrittenHeadersTest(ChatterdTestCase):
    """Once a stream is under way it keeps none of its four header sets (about 1.5 KiB each):
    SENT_HEADERS stands in for the response's and the upstream request's; the request's and
    the upstream response's, which Tornado's frames hold, are emptied in place."""

    def test_a_streaming_turn_keeps_neither_header_set(self) -> None:
        from handlers.chat import LLMChatHandler
        self.double.behave("slow", reply="a b c d e f", token_delay=0.05)
        seen = {}
        original = LLMChatHandler._on_lines

        def spy(handler, lines):  # type: ignore[no-untyped-def]
            if "handler" not in seen:  # the first lines: the stream is open by the second
                seen["handler"] = handler
            elif "headers" not in seen:
                seen["headers"] = handler._headers
                seen["upstream"] = handler.call._request.headers
                seen["request"] = len(handler.request.headers)
                seen["upstream response"] = handler.call._connection.headers
                handler.set_header("X-Late", "1")  # goes nowhere, as after any write
                handler.add_header("X-Late", "2")
                handler.clear_header("Content-Type")
                seen["late"] = len(handler._headers)
            return original(handler, lines)

        LLMChatHandler._on_lines = spy
        try:
            response = self.post_json("/llmchat", chat_body("hdrs", "hi", model="slow"))
        finally:
            LLMChatHandler._on_lines = original
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Content-Type"], "text/event-stream")
        self.assertIn("sent=", response.headers["X-Chatterd-Context"])
        self.assertNotIn("X-Late", response.headers)
        self.assertIn(b"data: ", response.body)
        self.assertIs(seen["headers"], SENT_HEADERS)
        self.assertIs(seen["upstream"], SENT_HEADERS)
        self.assertEqual(seen["late"], 0)
        self.assertEqual(seen["request"], 0)
        self.assertEqual(len(seen["upstream response"]), 0)
        self.assertEqual(list(seen["upstream response"].get_all()), [])
        self.assertEqual(len(SENT_HEADERS), 0)  # shared: nothing ever lands in it

    def test_sent_headers_take_nothing(self) -> None:
        headers = SentHeaders()
        headers["A"] = "1"
        headers.add("B", "2")
        headers.update({"C": "3"})
        self.assertEqual(list(headers.get_all()), [])
        self.assertNotIn("A", headers)

    def test_empty_in_place_frees_the_tables(self) -> None:
        import sys
        headers = HTTPHeaders({f"X-{i}": "v" * 40 for i in range(8)})
        # (if Tornado's HTTPHeaders ever keeps its fields elsewhere, this must change)
        self.assertEqual(set(vars(headers)), {"_as_list", "_combined_cache"})
        empty = HTTPHeaders()
        empty_in_place(headers)
        self.assertEqual(len(headers), 0)
        self.assertIsNone(headers.get("X-1"))
        self.assertEqual(sys.getsizeof(headers._as_list), sys.getsizeof(empty._as_list))
        self.assertEqual(sys.getsizeof(headers._combined_cache),
                         sys.getsizeof(empty._combined_cache))

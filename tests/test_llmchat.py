"""POST /llmchat against a real PostgreSQL and the Ollama double: the happy paths,
history, verbatim storage and every error before the stream starts."""

import time

import asyncpg

import jsonfmt
from tests.ollama_double import default_reply, split_tokens
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_body


class LLMChatTest(ChatterdTestCase):
    def chat(self, body, **kwargs):
        response = self.post_json("/llmchat", body, **kwargs)
        events, comments = parse(response.body) if response.code == 200 else ([], [])
        return response, events, comments

    def test_streams_sse_and_stores_reply_verbatim(self):
        with self.assertLogs("chatterd.access") as logs:
            response, events, _ = self.chat(chat_body("app1", "Hello\n  there"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Content-Type"], "text/event-stream")
        self.assertEqual(response.headers["Cache-Control"], "no-cache")
        self.assertEqual(response.headers["X-Accel-Buffering"], "no")
        self.assertTrue(all(e.event == "message" for e in events))
        chunks = [jsonfmt.loads(e.data) for e in events]
        self.assertTrue(chunks[-1]["done"])
        self.assertTrue(all(not c["done"] for c in chunks[:-1]))
        streamed = "".join(c["message"]["content"] for c in chunks)
        expected = default_reply([{"role": "user", "content": "Hello\n  there"}])
        self.assertEqual(streamed, expected)
        rows = self.rows("app1")
        self.assertEqual([(r["role"], r["content"], r["status"]) for r in rows],
                         [("user", "Hello\n  there", "complete"), ("assistant", expected, "complete")])
        self.assertEqual(rows[1]["tokens"], chunks[-1]["eval_count"])
        self.assertEqual(rows[1]["model"], "llama3.2")
        (line,) = logs.output
        self.assertRegex(line, r"200 127\.0\.0\.1 POST /llmchat \d+\.\dms appID='app1' "
                               f"tokens={rows[1]['tokens']} outcome='complete'")

    def test_long_reply_is_stored_exactly(self):
        text = "".join(f"line {i}:\t{'x' * (i % 7)}  \n" for i in range(1500))  # ~4500 tokens
        self.double.behave("long", reply=text)
        response, events, _ = self.chat(chat_body("long", "go", model="long"))
        self.assertEqual(len(events), len(split_tokens(text)) + 1)
        self.assertEqual(self.rows("long")[1]["content"], text)

    def test_each_event_is_the_upstream_line_verbatim(self):
        response, events, _ = self.chat(chat_body("app1", "<b>&</b>"))
        sent = self.double.chat_requests()[0].lines_sent
        self.assertEqual([e.data.encode() for e in events], sent)
        # The stream opens with what the turn sent and left out, as a comment (docs/api.md).
        comment = b": context " + response.headers["X-Chatterd-Context"].encode() + b"\n\n"
        # Each event names the turn and its place in it (docs/api.md, "Resuming a stream").
        turn = int(response.headers["X-Chatterd-Turn"])
        self.assertEqual(response.body, comment + b"".join(
            b"id: %d:%d\ndata: %s\n\n" % (turn, n, line) for n, line in enumerate(sent, 1)))
        # Go's escaping of < > & survives: we forward bytes, we do not re-encode.
        self.assertIn(b"\\u003c", response.body)

    def test_third_turn_sends_whole_history_in_order(self):
        prep = {"appID": "h", "model": "llama3.2", "stream": False,
                "messages": [{"role": "system", "content": "Be  terse.\n"}]}
        self.assertEqual(self.post_json("/llmprep", prep).code, 200)
        replies = []
        for text in ("one", "two\n\n  two", "three"):
            if text == "three":
                # Move the first turn's row to the end of the table's physical order and
                # make PostgreSQL read the heap, not the (appid, owner_id, seq) index: now only an
                # explicit ORDER BY seq still puts it first.
                self.io_loop.run_sync(lambda: self.pool.execute(
                    "UPDATE messages SET content = content WHERE content = 'one';"
                    " DROP INDEX messages_appid_seq"))
            try:
                response, events, _ = self.chat(chat_body("h", text))
            finally:
                if text == "three":
                    self.io_loop.run_sync(lambda: self.pool.execute(
                        "CREATE INDEX messages_appid_seq ON messages (appid, owner_id, seq)"))
            self.assertEqual(response.code, 200)
            replies.append("".join(jsonfmt.loads(e.data)["message"]["content"] for e in events))
        sent = self.double.chat_requests()[2].body
        self.assertEqual(sent["messages"], [
            {"role": "system", "content": "Be  terse.\n"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": "two\n\n  two"},
            {"role": "assistant", "content": replies[1]},
            {"role": "user", "content": "three"},
        ])
        self.assertNotEqual(replies[0], replies[1])  # the double's reply depends on the turn
        self.assertNotIn("appID", sent)

    def test_system_prompt_goes_first_even_if_stored_later(self):
        self.chat(chat_body("s", "hi"))
        body = chat_body("s", "again")
        body["messages"].insert(0, {"role": "system", "content": "late system"})
        self.chat(body)
        roles = [m["role"] for m in self.double.chat_requests()[1].body["messages"]]
        self.assertEqual(roles, ["system", "user", "assistant", "user"])

    def test_ollama_fields_pass_through(self):
        body = chat_body("p", "x", options={"temperature": 0.2, "num_ctx": 8192}, format="json",
                         keep_alive="10m", think=False)
        self.assertEqual(self.chat(body)[0].code, 200)
        sent = self.double.chat_requests()[0].body
        self.assertEqual(sent["options"], {"temperature": 0.2, "num_ctx": 8192})
        self.assertEqual((sent["format"], sent["keep_alive"], sent["think"]), ("json", "10m", False))
        self.assertTrue(sent["stream"])
        self.assertEqual(set(sent) - {"options", "format", "keep_alive", "think"},
                         {"model", "messages", "stream"})

    def test_trailing_slash_and_missing_stream_field(self):
        body = chat_body("t", "x")
        del body["stream"]  # Ollama's default: stream
        response, events, _ = self.chat(body, )
        self.assertEqual(response.code, 200)
        response = self.post_json("/llmchat/", chat_body("t", "y"))
        self.assertEqual(response.code, 200)
        self.assertGreater(len(parse(response.body)[0]), 1)

    def test_stream_false_returns_ollamas_object_and_stores(self):
        response = self.post_json("/llmchat", chat_body("nf", "quiet", stream=False))
        self.assertEqual(response.code, 200)
        answer = jsonfmt.loads(response.body)
        self.assertTrue(answer["done"])
        self.assertEqual(answer["message"]["content"],
                         default_reply([{"role": "user", "content": "quiet"}]))
        self.assertFalse(self.double.chat_requests()[0].body["stream"])
        self.assertEqual([r["content"] for r in self.rows("nf")],
                         ["quiet", answer["message"]["content"]])

    def test_reply_text_on_the_done_line_is_kept(self):
        self.double.behave("tail", reply="Hello", final_content=" world")
        response, events, _ = self.chat(chat_body("tail", "hi", model="tail"))
        self.assertEqual(jsonfmt.loads(events[-1].data)["message"]["content"], " world")
        self.assertEqual(self.rows("tail")[1]["content"], "Hello world")

    def test_chat_is_not_on_the_public_board(self):
        self.assertEqual(self.chat(chat_body("b", "secret"))[0].code, 200)
        self.assertEqual(jsonfmt.loads(self.fetch("/getchatts").body), [])

    def test_events_arrive_spread_in_time(self):
        self.double.behave("slow", token_delay=0.2)
        arrivals = []
        response = self.post_json("/llmchat", chat_body("u", "go", model="slow"),
                                  streaming_callback=lambda c: arrivals.append((time.monotonic(), c)),
                                  request_timeout=30)
        self.assertEqual(response.code, 200)
        upstream = self.double.chat_requests()[0]
        first_event = next(t for t, c in arrivals if b"data:" in c)
        # The client had the first token while the double was still generating.
        self.assertLess(first_event, upstream.finished_at - 0.2)
        self.assertGreater(len(arrivals), 3)


class LLMChatRejectionTest(ChatterdTestCase):
    def assert_rejected(self, body, code, fragment, app_id="r"):
        response = self.post_json("/llmchat", body)
        self.assertEqual(response.code, code, response.body)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        error = jsonfmt.loads(response.body)["error"]
        self.assertIn(fragment, error)
        self.assertEqual(self.rows(app_id), [], "a rejected request must store nothing")
        return error

    def test_body_not_a_json_object(self):
        for body in (b"", b"not json", b"[1, 2]", b'"text"', b"{"):
            with self.subTest(body=body):
                self.assert_rejected(body, 400, "JSON")

    def test_invalid_fields_name_the_field(self):
        ok = chat_body("r", "hi")
        cases = [
            ({k: v for k, v in ok.items() if k != "appID"}, "appID is required"),
            ({**ok, "appID": ""}, "appID must not be empty"),
            ({**ok, "appID": 7}, "appID must be a string"),
            ({**ok, "appID": "x" * 156}, "longer than 155"),
            ({**ok, "model": ""}, "model"),
            ({**ok, "messages": "hi"}, "messages must be a list"),
            ({**ok, "messages": []}, "messages must not be empty"),
            ({**ok, "messages": ["hi"]}, "messages[0] must be an object"),
            ({**ok, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
            ({**ok, "messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
            ({**ok, "messages": [{"role": "user"}]}, "messages[0].content is missing"),
            ({**ok, "messages": [{"role": "user", "content": "a\u0000b"}]}, "NUL"),
            ({**ok, "stream": "yes"}, "stream must be true or false"),
            ('{"appID": "r", "model": "m", "messages": [{"role": "user", "content": "x"}],'
             ' "options": {"temperature": NaN}}', "NaN"),
        ]
        for body, fragment in cases:
            with self.subTest(fragment=fragment):
                self.assert_rejected(body, 422, fragment)
        self.assertEqual(self.double.chat_requests(), [])

    def test_body_over_the_limit_is_413(self):
        body = chat_body("r", "x" * (self.config.max_body_size + 1))
        self.assert_rejected(body, 413, "larger than")

    def test_unknown_model_is_ollamas_404(self):
        error = self.assert_rejected(chat_body("r", "hi", model="nope"), 404, "model 'nope' not found")
        self.assertIn("Ollama", error)

    def test_busy_ollama_is_503(self):
        self.double.behave("busy", status=503, error="server busy, please try again.")
        self.assert_rejected(chat_body("r", "hi", model="busy"), 503, "server busy")

    def test_stream_false_timeout_is_504(self):
        self.double.behave("cold", header_delay=5)
        self.upstreams.members[0].client.idle_timeout = 0.5
        self.assert_rejected(chat_body("r", "hi", model="cold", stream=False), 504, "sent nothing")

    def test_error_before_any_output_keeps_ollamas_status(self):
        self.double.behave("oom", error="model runner has unexpectedly stopped", error_after=0)
        self.assert_rejected(chat_body("r", "hi", model="oom"), 500, "unexpectedly stopped")

    def test_ollama_400_passes_through(self):
        self.double.behave("nothink", status=400, error='"nothink" does not support thinking')
        self.assert_rejected(chat_body("r", "hi", model="nothink"), 400, "does not support thinking")


class OllamaUnreachableTest(ChatterdTestCase):
    def upstream_specs(self):
        from tornado.testing import bind_unused_port

        sock, port = bind_unused_port()
        sock.close()  # nothing listens here now
        self.dead_url = f"http://127.0.0.1:{port}/api"
        return self.dead_url

    def test_502_names_the_url_and_stores_nothing(self):
        response = self.post_json("/llmchat", chat_body("d", "hi"))
        self.assertEqual(response.code, 502)
        self.assertIn(self.dead_url[: -len("/api")], jsonfmt.loads(response.body)["error"])
        self.assertEqual(self.rows("d"), [])


class StoreFailureTest(ChatterdTestCase):
    """The course's test: a failing insert of the reply must surface as an error event."""

    async def add_trigger(self):
        con = await asyncpg.connect(self.dsn())
        await con.execute("""
            CREATE FUNCTION refuse_reply() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'replies refused for this test'; END $$;
            CREATE TRIGGER refuse_reply BEFORE INSERT ON chatterd.messages FOR EACH ROW
            WHEN (NEW.role = 'assistant' AND NEW.appid = 'storefail') EXECUTE FUNCTION refuse_reply();
        """)
        await con.close()

    async def drop_trigger(self):
        con = await asyncpg.connect(self.dsn())
        await con.execute("DROP TRIGGER IF EXISTS refuse_reply ON chatterd.messages;"
                          " DROP FUNCTION IF EXISTS refuse_reply();")
        await con.close()

    def test_failed_insert_becomes_error_event(self):
        self.io_loop.run_sync(self.add_trigger)
        try:
            response = self.post_json("/llmchat", chat_body("storefail", "hi"))
        finally:
            self.io_loop.run_sync(self.drop_trigger)
        self.assertEqual(response.code, 200)
        events, _ = parse(response.body)
        # `done` promises the turn is stored, so it never comes: the error does instead.
        self.assertFalse(any(e.event == "message" and jsonfmt.loads(e.data).get("done")
                             for e in events))
        self.assertEqual(events[-1].event, "error")
        self.assertIn("replies refused for this test", jsonfmt.loads(events[-1].data)["error"])


class DatabaseUnavailableTest(ChatterdTestCase):
    def dsn(self):
        from tornado.testing import bind_unused_port

        sock, port = bind_unused_port()
        sock.close()
        return f"postgresql://postgres@127.0.0.1:{port}/none"

    def test_every_database_endpoint_says_503(self):
        for method, path, body in (("POST", "/llmchat", chat_body("x", "hi")),
                                   ("POST", "/llmprep", chat_body("x", "hi")),
                                   ("POST", "/postchatt", {"name": "a", "message": "b"}),
                                   ("GET", "/getchatts", None)):
            with self.subTest(path=path):
                if body is None:
                    response = self.fetch(path, raise_error=False)
                else:
                    response = self.post_json(path, body)
                self.assertEqual(response.code, 503)
                self.assertIn("database unavailable", jsonfmt.loads(response.body)["error"])
        self.assertEqual(self.double.chat_requests(), [])

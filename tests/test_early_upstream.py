"""--early-upstream: a known conversation's turn is sent upstream while begin_turn runs, and
its answer relayed only once begin_turn has confirmed the lease and exactly the history sent.

Each test attacks the window between the two: another process's turn, a busy appID, a
resend, a client that leaves, an upstream that fails, a lease row held by another
transaction; and checks from outside what the upstream was sent, what the client got and
what is stored."""

import asyncio
import os
import socket

import asyncpg
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import gen_test

import jsonfmt
import metrics
from db.conversations import ANONYMOUS, Reply
from tests.ollama_double import default_reply
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_body, streams_finished
from turns import TurnKeeper


def early(outcome: str) -> float:
    return metrics.EARLY_UPSTREAM.labels(outcome=outcome)._value.get()


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def answer_text(body: bytes) -> str:
    events, _ = parse(body)
    return "".join(jsonfmt.loads(e.data)["message"]["content"] for e in events if e.data)


async def until(condition, timeout: float = 10.0) -> None:
    """Wait until *condition()* holds (it watches state this test cannot be told about)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.005)


class EarlyUpstreamTest(ChatterdTestCase):
    settings_overrides = {"max_streams": 1, "queue_timeout": 2.0}

    async def chat(self, app_id: str, content: str, **kwargs) -> bytes:
        response = await AsyncHTTPClient().fetch(
            self.get_url("/llmchat"), method="POST", raise_error=False, request_timeout=20,
            body=jsonfmt.dumps(chat_body(app_id, content, **kwargs)))
        self.assertEqual(response.code, 200, response.body)
        return response.body

    async def known(self, app_id: str, turns: int = 2) -> list[dict]:
        """A conversation of *turns* turns, all through this process: the history it has."""
        history: list[dict] = []
        for n in range(turns):
            history.append(user(f"q{n}"))
            text = answer_text(await self.chat(app_id, f"q{n}"))
            self.assertEqual(text, default_reply(history))
            history.append({"role": "assistant", "content": text})
        await streams_finished(self._app)
        return history

    def other_process(self) -> TurnKeeper:
        """The turn keeper of another chatterd process on the same database (its own
        process name, lease renewals and history cache)."""
        keeper = TurnKeeper(self.pool, self.config)
        self.addCleanup(keeper.close)
        return keeper

    async def raw_chat(self, app_id: str, content: str) -> tuple:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
        payload = jsonfmt.dumpb(chat_body(app_id, content))
        writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        await writer.drain()
        return reader, writer

    async def hold_lease_row(self, app_id: str) -> asyncpg.Connection:
        """Lock the appID's lease row in another transaction: begin_turn waits on it."""
        con = await asyncpg.connect(self.dsn())
        await con.execute("BEGIN")
        await con.execute("SELECT 1 FROM chatterd.leases WHERE owner_id = $1 AND appid = $2"
                          " FOR UPDATE", ANONYMOUS, app_id)
        return con

    async def chats(self, count: int) -> list:
        """The first *count* chat requests, once the last has been read whole."""
        requests = await self.double.wait_for_chats(count)
        await until(lambda: requests[count - 1].body is not None)
        return requests

    def handler_of(self, app_id: str):
        return next(h for h in self._app.in_flight if getattr(h, "app_id", None) == app_id)

    # -- the plain case -----------------------------------------------------------------

    @gen_test(timeout=30)
    async def test_the_request_reaches_the_model_before_the_turn_begins_and_nothing_before_it_has(self):
        history = await self.known("e1")
        confirmed = early("confirmed")
        lock = await self.hold_lease_row("e1")
        try:
            reader, writer = await self.raw_chat("e1", "q2")
            # begin_turn waits for the lock, yet the model has the turn, with the history
            # this process knows: and it has answered.
            requests = await self.chats(3)
            self.assertEqual(requests[2].messages, history + [user("q2")])
            await until(lambda: requests[2].finished_at is not None)
            handler = self.handler_of("e1")
            await until(lambda: handler.early is not None and handler.early._gate is not None)
            # Its first lines are held: the client has not a byte, not even the headers.
            peek = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
            try:
                with self.assertRaises(BlockingIOError):
                    peek.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            finally:
                peek.close()
        finally:
            await lock.execute("ROLLBACK")
            await lock.close()
        body = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 10)
        writer.close()
        self.assertIn(b"200 OK", body.split(b"\r\n", 1)[0])
        self.assertIn(b'"content":" #5"', body)  # the answer to the 5 messages it was sent
        await streams_finished(self._app)
        self.assertEqual(len(self.double.chat_requests()), 3)  # asked once
        self.assertEqual(early("confirmed"), confirmed + 1)
        rows = await self.conversation("e1")
        self.assertEqual([r["content"] for r in rows if r["role"] == "user"], ["q0", "q1", "q2"])
        self.assertEqual(rows[-1]["content"], default_reply(history + [user("q2")]))

    @gen_test(timeout=30)
    async def test_a_conversation_this_process_never_saw_waits_for_begin_turn(self):
        other = self.other_process()
        turn = await other.begin(ANONYMOUS, "e2", [user("elsewhere")])
        await turn.end("complete", Reply(content="stored elsewhere"))
        cancelled, confirmed = early("cancelled"), early("confirmed")
        text = answer_text(await self.chat("e2", "here"))
        sent = [user("elsewhere"), {"role": "assistant", "content": "stored elsewhere"}, user("here")]
        self.assertEqual([r.messages for r in self.double.chat_requests()], [sent])
        self.assertEqual(text, default_reply(sent))
        self.assertEqual((early("cancelled"), early("confirmed")), (cancelled, confirmed))

    # -- what begin_turn refutes ------------------------------------------------------------

    @gen_test(timeout=30)
    async def test_a_turn_stored_by_another_process_meanwhile_cancels_the_early_request(self):
        history = await self.known("e3")
        other = self.other_process()
        turn = await other.begin(ANONYMOUS, "e3", [user("from the other process")])
        await turn.end("complete", Reply(content="its answer"))
        self.double.behave("llama3.2", token_delay=0.05)  # still answering when cancelled
        cancelled = early("cancelled")
        text = answer_text(await self.chat("e3", "q2"))
        await streams_finished(self._app)
        real = history + [user("from the other process"),
                          {"role": "assistant", "content": "its answer"}, user("q2")]
        stale, sent = self.double.chat_requests()[2:]
        self.assertEqual(stale.messages, history + [user("q2")])  # what this process knew
        await asyncio.wait_for(stale.closed.wait(), 5)  # ... aborted, not read to its end
        self.assertEqual(sent.messages, real)
        self.assertEqual(early("cancelled"), cancelled + 1)
        # Only the answer to the real history reached the client and the conversation.
        self.assertEqual(text, default_reply(real))
        rows = await self.conversation("e3")
        self.assertEqual([r["content"] for r in rows],
                         [m["content"] for m in real] + [default_reply(real)])
        self.assertNotIn(default_reply(history + [user("q2")]), [r["content"] for r in rows])

    @gen_test(timeout=30)
    async def test_a_direct_write_of_the_conversation_is_seen(self):
        """A row changed under the process's feet (the last turn's message edited in SQL;
        an older one, which the history cache holds, is sent as cached, early or not):
        the early request carried the old text, so it is cancelled."""
        history = await self.known("e4")
        con = await asyncpg.connect(self.dsn())
        try:
            await con.execute("UPDATE chatterd.messages SET content = 'edited'"
                              " WHERE appid = 'e4' AND content = 'q1'")
        finally:
            await con.close()
        cancelled = early("cancelled")
        self.assertEqual(answer_text(await self.chat("e4", "q2")),
                         default_reply(history[:2] + [user("edited"), history[3], user("q2")]))
        stale, sent = self.double.chat_requests()[2:]
        self.assertEqual(stale.messages[2], user("q1"))
        self.assertEqual(sent.messages[2], user("edited"))
        self.assertEqual(early("cancelled"), cancelled + 1)

    @gen_test(timeout=30)
    async def test_a_busy_appid_cancels_the_early_request_and_gives_its_slot_back(self):
        """--max-streams 1: the cancelled request's slot is free again at once."""
        history = await self.known("e5")
        self._app.turns.wait = 0.5
        other = self.other_process()
        running = await other.begin(ANONYMOUS, "e5", [user("running elsewhere")])
        self.double.behave("llama3.2", token_delay=0.05)
        cancelled = early("cancelled")
        response = await AsyncHTTPClient().fetch(
            self.get_url("/llmchat"), method="POST", raise_error=False, request_timeout=20,
            body=jsonfmt.dumps(chat_body("e5", "q2")))
        self.assertEqual(response.code, 409, response.body)
        early_request = self.double.chat_requests()[2]
        self.assertEqual(early_request.messages, history + [user("q2")])
        await asyncio.wait_for(early_request.closed.wait(), 5)
        self.assertEqual(early("cancelled"), cancelled + 1)
        self.assertEqual(self._app.upstreams.members[0].client.slots.busy, 0)
        # The one slot serves the next turn (another appID) at once.
        self.double.behave("llama3.2", token_delay=0.0)
        answer_text(await self.chat("e5-next", "hello"))
        await running.end("complete", Reply(content="done elsewhere"))
        statuses = [t["status"] for t in await self.turns("e5")]
        self.assertEqual(statuses, ["complete", "complete", "complete"])  # the 409 stored nothing
        rows = await self.conversation("e5")
        self.assertEqual([r["content"] for r in rows][-2:], ["running elsewhere", "done elsewhere"])

    @gen_test(timeout=30)
    async def test_a_turn_that_waits_for_a_busy_appid_is_sent_what_it_finds(self):
        history = await self.known("e6")
        other = self.other_process()
        running = await other.begin(ANONYMOUS, "e6", [user("running elsewhere")])
        self.double.behave("llama3.2", token_delay=0.02)  # still answering when cancelled
        chat = asyncio.ensure_future(self.chat("e6", "q2"))
        early_request = (await self.chats(3))[2]
        await asyncio.wait_for(early_request.closed.wait(), 5)  # cancelled: the appID is busy
        await running.end("complete", Reply(content="done elsewhere"))
        text = answer_text(await chat)
        real = history + [user("running elsewhere"),
                          {"role": "assistant", "content": "done elsewhere"}, user("q2")]
        self.assertEqual([r.messages for r in self.double.chat_requests()[2:]],
                         [history + [user("q2")], real])
        self.assertEqual(text, default_reply(real))

    @gen_test(timeout=30)
    async def test_a_resend_of_another_process_s_turn_is_answered_from_storage(self):
        """The process knows the conversation up to q1; another process stored q2, whose
        `done` never reached its client, which resends it here: the stored answer is sent,
        the early request cancelled, and nothing stored twice."""
        history = await self.known("e7")
        other = self.other_process()
        turn = await other.begin(ANONYMOUS, "e7", [user("q2")], budget=6144, context=8192)
        await turn.end("complete", Reply(content="the stored answer"))
        cancelled = early("cancelled")
        response = await AsyncHTTPClient().fetch(
            self.get_url("/llmchat"), method="POST", raise_error=False, request_timeout=20,
            body=jsonfmt.dumps(chat_body("e7", "q2")))
        self.assertEqual(response.code, 200)
        self.assertIn("X-Chatterd-Replayed", response.headers)
        self.assertEqual(answer_text(response.body), "the stored answer")
        self.assertEqual(early("cancelled"), cancelled + 1)
        early_request = self.double.chat_requests()[2]
        self.assertEqual(early_request.messages, history + [user("q2")])
        self.assertEqual(len(self.double.chat_requests()), 3)  # the model was not asked again
        rows = await self.conversation("e7")
        self.assertEqual([r["content"] for r in rows if r["role"] == "user"], ["q0", "q1", "q2"])

    @gen_test(timeout=30)
    async def test_the_same_words_again_are_not_sent_early(self):
        """The last turn's messages again are likely a resend: begin_turn decides first."""
        await self.known("e8")
        confirmed, cancelled = early("confirmed"), early("cancelled")
        await self.chat("e8", "q1")
        self.assertEqual((early("confirmed"), early("cancelled")), (confirmed, cancelled))
        self.assertEqual(len(self.double.chat_requests()), 3)

    # -- the client and the upstream during the window ----------------------------------

    @gen_test(timeout=30)
    async def test_a_client_that_leaves_during_the_window_leaves_nothing_behind(self):
        await self.known("e9")
        self.double.behave("llama3.2", token_delay=0.05)
        lock = await self.hold_lease_row("e9")
        try:
            reader, writer = await self.raw_chat("e9", "gone")
            early_request = (await self.chats(3))[2]
            writer.transport.abort()
            await asyncio.wait_for(early_request.closed.wait(), 5)  # the model is told to stop
        finally:
            await lock.execute("ROLLBACK")
            await lock.close()
        await streams_finished(self._app)
        statuses = [t["status"] for t in await self.turns("e9")]
        self.assertEqual(statuses, ["complete", "complete", "rejected"])
        self.assertEqual([r["content"] for r in await self.conversation("e9")
                          if r["role"] == "user"], ["q0", "q1"])
        self.assertEqual(len(self.double.chat_requests()), 3)
        self.assertEqual(self._app.upstreams.members[0].client.slots.busy, 0)
        # The conversation is still known: the next turn is sent early and confirmed.
        confirmed = early("confirmed")
        self.double.behave("llama3.2", token_delay=0.0)
        await self.chat("e9", "q2")
        self.assertEqual(early("confirmed"), confirmed + 1)

    @gen_test(timeout=30)
    async def test_an_upstream_error_during_the_window_is_the_turn_s_answer(self):
        """The early request failed (503) before begin_turn answered: the client gets that
        status, as it would have after begin_turn, and the turn is rejected."""
        history = await self.known("e10")
        self.double.behave("llama3.2", status=503, error="overloaded")
        lock = await self.hold_lease_row("e10")
        try:
            chat = asyncio.ensure_future(AsyncHTTPClient().fetch(
                self.get_url("/llmchat"), method="POST", raise_error=False, request_timeout=20,
                body=jsonfmt.dumps(chat_body("e10", "q2"))))
            early_request = (await self.chats(3))[2]
            await until(lambda: early_request.finished_at is not None)
        finally:
            await lock.execute("ROLLBACK")
            await lock.close()
        response = await chat
        self.assertEqual(response.code, 503)
        self.assertEqual(jsonfmt.loads(response.body), {"error": "Ollama: overloaded"})
        self.assertEqual(early_request.messages, history + [user("q2")])
        self.assertEqual([t["status"] for t in await self.turns("e10")],
                         ["complete", "complete", "rejected"])
        self.assertEqual(len(self.double.chat_requests()), 3)

    @gen_test(timeout=30)
    async def test_an_upstream_reset_during_the_window_fails_the_turn_with_what_was_said(self):
        history = await self.known("e11")
        self.double.behave("llama3.2", reset_after=2)
        lock = await self.hold_lease_row("e11")
        try:
            chat = asyncio.ensure_future(AsyncHTTPClient().fetch(
                self.get_url("/llmchat"), method="POST", raise_error=False, request_timeout=20,
                body=jsonfmt.dumps(chat_body("e11", "q2"))))
            await self.chats(3)
            handler = self.handler_of("e11")
            await until(lambda: handler.early is not None and handler.early._gate is not None)
        finally:
            await lock.execute("ROLLBACK")
            await lock.close()
        response = await chat
        self.assertEqual(response.code, 200)
        events, _ = parse(response.body)
        self.assertEqual(events[-1].event, "error")
        said = "".join(jsonfmt.loads(e.data)["message"]["content"] for e in events[:-1])
        self.assertTrue(said)
        await streams_finished(self._app)
        rows = await self.conversation("e11")
        self.assertEqual((rows[-1]["status"], rows[-1]["content"]), ("failed", said))
        self.assertEqual(self.double.chat_requests()[2].messages, history + [user("q2")])


class EarlyUpstreamOffTest(ChatterdTestCase):
    settings_overrides = {"early_upstream": False}

    @gen_test(timeout=30)
    async def test_off_every_turn_waits_for_begin_turn(self):
        for n in range(3):
            await AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST",
                                          body=jsonfmt.dumps(chat_body("off", f"q{n}")))
        await streams_finished(self._app)
        self.assertEqual(self._app.turns.forecasts.size, 0)
        self.assertFalse(self._app.turns.forecasts.known)
        self.assertEqual(len(self.double.chat_requests()), 3)

"""The turn contract (docs/turn-contract.md): whole turns, one at a time per appID,
rejected turns never seen, an idempotent end, leases that free a dead process's appIDs."""

import asyncio

import asyncpg
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import AsyncTestCase, gen_test

import jsonfmt
import settings
from turns import CUT_WARNING_EVERY, Turn, TurnKeeper
from db import conversations
from db.conversations import ANONYMOUS
from tests.message_shape import shape_problems
from tests.ollama_double import default_reply
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_and_leave, chat_body, streams_finished


def contents(messages):
    return [(m["role"], m["content"]) for m in messages]


class TurnOrderTest(ChatterdTestCase):
    @gen_test(timeout=30)
    async def test_stop_then_type_sees_the_interrupted_reply_first(self):
        """Press stop and send the next message at once: the partial reply is stored before
        the next turn reads the conversation, and that turn is sent it."""
        self.double.behave("slow", token_delay=0.05, reply="word " * 100)
        for round_ in range(5):
            await chat_and_leave(self.get_http_port(), chat_body("stt", f"q{round_}", model="slow"))
            # No waiting: the next turn is sent the moment the client has left.
            response = await AsyncHTTPClient().fetch(
                self.get_url("/llmchat"), method="POST", request_timeout=20,
                body=jsonfmt.dumps(chat_body("stt", f"next{round_}")))
            self.assertEqual(response.code, 200)
        await streams_finished(self._app)
        rows = await self.conversation("stt")
        expected_roles = ["user", "assistant"] * 10
        self.assertEqual([r["role"] for r in rows], expected_roles)
        self.assertEqual([r["status"] for r in rows[1::2]], ["interrupted", "complete"] * 5)
        self.assertEqual([r["content"] for r in rows[0::2]],
                         [c for i in range(5) for c in (f"q{i}", f"next{i}")])
        # Every upstream request of a "next" turn carried the interrupted reply right before it.
        for request in self.double.chat_requests():
            sent = request.body["messages"]
            self.assertEqual(sent[-1]["role"], "user")
            if sent[-1]["content"].startswith("next"):
                self.assertEqual(sent[-2]["role"], "assistant")
                self.assertTrue(sent[-2]["content"].startswith("word"), sent)

    @gen_test(timeout=60)
    async def test_concurrent_turns_of_one_appid_are_whole_and_answer_their_own_question(self):
        """A double send, two devices on one bundle ID: turns queue, none interleaves."""
        self.double.behave("llama3.2", token_delay=0.002)
        client = AsyncHTTPClient(force_instance=True, max_clients=20)
        try:
            responses = await asyncio.gather(*[
                client.fetch(self.get_url("/llmchat"), method="POST", request_timeout=60,
                             body=jsonfmt.dumps(chat_body("dbl", f"question {i}")))
                for i in range(12)])
        finally:
            client.close()
        self.assertEqual([r.code for r in responses], [200] * 12)
        rows = await self.conversation("dbl")
        self.assertEqual([r["role"] for r in rows], ["user", "assistant"] * 12)
        history: list[dict] = []
        for user, reply in zip(rows[0::2], rows[1::2]):
            history.append({"role": "user", "content": user["content"]})
            # The double's reply quotes the last user message and counts the messages it got.
            self.assertEqual(reply["content"], default_reply(history))
            history.append({"role": "assistant", "content": reply["content"]})
        for response in responses:
            events, _ = parse(response.body)
            self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
        # Each upstream request held exactly the conversation before it plus its own question.
        requests = self.double.chat_requests()
        for request in requests:
            sent = request.body["messages"]
            self.assertEqual(contents(sent[:-1]), contents(history[:len(sent) - 1]))

    def test_a_turn_waits_at_most_turn_wait_then_gets_409(self):
        self._app.turns.wait = 0.3
        self.double.behave("slow", token_delay=0.1, reply="word " * 50)
        first = self.http_client.fetch(self.get_url("/llmchat"), method="POST", raise_error=False,
                                       body=jsonfmt.dumps(chat_body("busy", "one", model="slow")))
        self.io_loop.run_sync(lambda: self.double.wait_for_chats(1))
        second = self.post_json("/llmchat", chat_body("busy", "two"))
        self.assertEqual(second.code, 409)
        self.assertIn("another turn of appID 'busy' is still running", jsonfmt.loads(second.body)["error"])
        self.assertEqual(self.io_loop.run_sync(lambda: first).code, 200)
        rows = self.rows("busy")
        self.assertEqual([r["content"] for r in rows if r["role"] == "user"], ["one"])
        statuses = [t["status"] for t in self.io_loop.run_sync(lambda: self.turns("busy"))]
        self.assertEqual(statuses, ["complete"])  # the 409 stored nothing at all

    @gen_test(timeout=20)
    async def test_a_client_that_leaves_while_waiting_stores_nothing(self):
        self.double.behave("slow", token_delay=0.05, reply="word " * 60)
        first = AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST", request_timeout=20,
                                        body=jsonfmt.dumps(chat_body("wl", "one", model="slow")))
        await self.double.wait_for_chats(1)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.get_http_port())
        payload = jsonfmt.dumpb(chat_body("wl", "waiting"))
        writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        await writer.drain()
        # Wait until the second turn is queued behind the first (it has no turn yet).
        while not any(getattr(h, "app_id", None) == "wl" and not hasattr(h, "turn")
                      and b"waiting" in getattr(h, "_body", b"") for h in self._app.in_flight):
            await asyncio.sleep(0.01)
        writer.transport.abort()
        await first
        await streams_finished(self._app)
        self.assertEqual(len(self.double.chat_requests()), 1)  # the waiting turn never reached Ollama
        self.assertEqual([t["status"] for t in await self.turns("wl")], ["complete"])


class RejectedTurnTest(ChatterdTestCase):
    def test_a_rejected_turn_is_never_sent_again(self):
        self.double.behave("missing", status=404, error="model 'missing' not found")
        self.assertEqual(self.post_json("/llmchat", chat_body("rj", "lost", model="missing")).code, 404)
        self.assertEqual(self.post_json("/llmchat", chat_body("rj", "kept")).code, 200)
        sent = self.double.chat_requests()[-1].body["messages"]
        self.assertEqual(contents(sent), [("user", "kept")])
        statuses = [t["status"] for t in self.io_loop.run_sync(lambda: self.turns("rj"))]
        self.assertEqual(statuses, ["rejected", "complete"])
        # The rejected turn's message is kept (durable), but outside the conversation.
        self.assertEqual([r["content"] for r in self.rows("rj")][0], "kept")

    def test_a_resent_turn_that_was_never_answered_is_stored_once(self):
        self.double.behave("down", status=503, error="server busy")
        body = chat_body("rs", "say it once", model="down")
        self.assertEqual(self.post_json("/llmchat", body).code, 503)
        self.double.behave("down", status=200)
        self.assertEqual(self.post_json("/llmchat", body).code, 200)
        self.assertEqual([r["content"] for r in self.rows("rs") if r["role"] == "user"],
                         ["say it once"])


class LeaseTest(ChatterdTestCase):
    async def dead_process_holds(self, app_id: str, seconds: float) -> int:
        """What a SIGKILLed process leaves: a running turn with pending messages, a lease."""
        got = await conversations.begin_turn(self.pool, ANONYMOUS, app_id, "dead-host:1:x", seconds,
                                             [{"role": "user", "content": "orphan"}])
        assert got[0] is not None
        return got[0]

    @gen_test(timeout=20)
    async def test_a_dead_processs_turn_is_abandoned_when_its_lease_expires(self):
        dead = await self.dead_process_holds("lz", 1.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST",
                                                 body=jsonfmt.dumps(chat_body("lz", "alive")))
        waited = loop.time() - started
        self.assertEqual(response.code, 200)
        self.assertGreater(waited, 0.5)  # it waited for the lease...
        self.assertLess(waited, 5)       # ...and not much longer
        sent = self.double.chat_requests()[0].body["messages"]
        self.assertEqual(contents(sent), [("user", "alive")])  # never the orphan
        turns = await self.turns("lz")
        self.assertEqual([(t["id"], t["status"]) for t in turns][0], (dead, "abandoned"))
        self.assertEqual(turns[1]["status"], "complete")
        # The dead process's late end (it was only paused, say) cannot enter it any more.
        outcome = await conversations.end_turn(self.pool, ANONYMOUS, dead, "complete", None,
                                               conversations.Reply(content="late"))
        self.assertEqual(outcome, "lost")
        self.assertNotIn("late", [r["content"] for r in await self.conversation("lz")])

    @gen_test(timeout=20)
    async def test_a_live_process_renews_its_lease_while_streaming(self):
        self._app.turns.lease = 0.6  # renewed every 0.2 s
        self.double.behave("slow", token_delay=0.05, reply="word " * 40)  # ~2 s, > the lease
        first = AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST", request_timeout=20,
                                        body=jsonfmt.dumps(chat_body("rn", "long", model="slow")))
        await self.double.wait_for_chats(1)
        con = await asyncpg.connect(self.dsn())
        try:
            # Another process tries to take the appID over while the lease should be alive.
            for _ in range(10):
                got = await con.fetchrow("SELECT * FROM chatterd.begin_turn(0, 'rn', 'other', 5, '[]')")
                self.assertIsNone(got["turn_id"])  # busy
                await asyncio.sleep(0.15)
        finally:
            await con.close()
        self.assertEqual((await first).code, 200)
        self.assertEqual([t["status"] for t in await self.turns("rn")], ["complete"])

    @gen_test(timeout=20)
    async def test_ending_a_turn_twice_stores_the_reply_once(self):
        got = await conversations.begin_turn(self.pool, ANONYMOUS, "twice", "me", 10,
                                             [{"role": "user", "content": "u"}])
        reply = conversations.Reply(content="a")
        self.assertEqual(await conversations.end_turn(self.pool, ANONYMOUS, got[0], "complete", None, reply),
                         "stored")
        self.assertEqual(await conversations.end_turn(self.pool, ANONYMOUS, got[0], "complete", None, reply),
                         "already")
        self.assertEqual(contents(await self.conversation("twice")), [("user", "u"), ("assistant", "a")])


class QueuedTurnTest(ChatterdTestCase):
    # status_grace is shorter than the queue wait: the 503 must still be a real status.
    settings_overrides = {"max_streams": 1, "queue_timeout": 0.5, "status_grace": 0.1}

    @gen_test(timeout=20)
    async def test_a_turn_queued_past_max_streams_gets_a_real_503_and_is_rejected(self):
        self.double.behave("slow", token_delay=0.05, reply="word " * 60)
        first = AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST", request_timeout=20,
                                        body=jsonfmt.dumps(chat_body("q1", "one", model="slow")))
        await self.double.wait_for_chats(1)
        second = await AsyncHTTPClient().fetch(
            self.get_url("/llmchat"), method="POST", raise_error=False,
            body=jsonfmt.dumps(chat_body("q2", "two")))
        self.assertEqual(second.code, 503)
        self.assertEqual(jsonfmt.loads(second.body),
                         {"error": "all 1 upstream slots are busy; retry later"})
        self.assertEqual((await first).code, 200)
        self.assertEqual(await self.conversation("q2"), [])
        self.assertEqual([t["status"] for t in await self.turns("q2")], ["rejected"])


class ResendTest(ChatterdTestCase):
    """A turn stored complete whose `done` never reached the client (its process died in
    between) is answered from storage when resent, not stored twice."""

    async def undeliver(self, app_id: str) -> None:
        # What a SIGKILL between the commit and the `done` write leaves behind: no record of
        # the delivery, neither stored nor waiting in the process to be stored.
        self._app.turns._delivered.clear()
        con = await asyncpg.connect(self.dsn())
        try:
            await con.execute("UPDATE chatterd.turns SET delivered = false WHERE appid = $1", app_id)
        finally:
            await con.close()

    def test_a_resend_of_an_undelivered_turn_replays_the_stored_answer(self):
        first = self.post_json("/llmchat", chat_body("rp", "once"))
        self.assertEqual(first.code, 200)
        turns = self.io_loop.run_sync(lambda: self.turns("rp"))
        self.io_loop.run_sync(lambda: self.undeliver("rp"))
        again = self.post_json("/llmchat", chat_body("rp", "once"))
        self.assertEqual(again.code, 200)
        events, _ = parse(again.body)
        self.assertEqual([jsonfmt.loads(e.data)["done"] for e in events], [False, True])
        stored = self.rows("rp")
        self.assertEqual(jsonfmt.loads(events[0].data)["message"]["content"], stored[1]["content"])
        self.assertEqual([r["content"] for r in stored if r["role"] == "user"], ["once"])
        self.assertEqual(len(self.double.chat_requests()), 1)  # the model was not asked again
        self.assertEqual(self.io_loop.run_sync(lambda: self.turns("rp")), turns)
        # Delivered now: the same words once more are a new question.
        self.assertEqual(self.post_json("/llmchat", chat_body("rp", "once")).code, 200)
        self.assertEqual([r["content"] for r in self.rows("rp") if r["role"] == "user"],
                         ["once", "once"])

    def test_a_non_streaming_resend_gets_the_stored_object(self):
        self.assertEqual(self.post_json("/llmchat", chat_body("rq", "q", stream=False)).code, 200)
        self.io_loop.run_sync(lambda: self.undeliver("rq"))
        again = self.post_json("/llmchat", chat_body("rq", "q", stream=False))
        answer = jsonfmt.loads(again.body)
        self.assertTrue(answer["done"])
        self.assertEqual(answer["message"]["content"], self.rows("rq")[1]["content"])
        self.assertEqual(len(self.rows("rq")), 2)

    def test_a_delivered_turn_sent_again_is_a_new_turn(self):
        for _ in range(2):
            self.assertEqual(self.post_json("/llmchat", chat_body("rd", "same")).code, 200)
        self.assertEqual([r["role"] for r in self.rows("rd")], ["user", "assistant"] * 2)
        self.assertEqual(len(self.double.chat_requests()), 2)

    def test_only_identical_messages_are_a_resend(self):
        self.assertEqual(self.post_json("/llmchat", chat_body("rx", "one")).code, 200)
        self.io_loop.run_sync(lambda: self.undeliver("rx"))
        self.assertEqual(self.post_json("/llmchat", chat_body("rx", "two")).code, 200)
        self.assertEqual([r["content"] for r in self.rows("rx") if r["role"] == "user"],
                         ["one", "two"])

    def test_a_resend_of_an_undelivered_failed_turn_replays_its_error(self):
        self.double.behave("breaks", error="model crashed", error_after=2)
        first = self.post_json("/llmchat", chat_body("rf", "go", model="breaks"))
        self.assertEqual(parse(first.body)[0][-1].event, "error")
        self.io_loop.run_sync(lambda: self.undeliver("rf"))
        again = self.post_json("/llmchat", chat_body("rf", "go", model="breaks"))
        self.assertIn("X-Chatterd-Replayed", again.headers)
        events, comments = parse(again.body)
        self.assertEqual(events[-1].event, "error")
        self.assertIn("model crashed", events[-1].data)
        self.assertEqual(jsonfmt.loads(events[0].data)["message"]["content"], self.rows("rf")[1]["content"])
        self.assertTrue(any("replay of turn" in c for c in comments))
        self.assertEqual(len(self.double.chat_requests()), 1)
        self.assertEqual([r["role"] for r in self.rows("rf")], ["user", "assistant"])


class UnansweredTurnTest(ChatterdTestCase):
    """A turn that ends before any answer text is a record outside the conversation: never
    sent again, never replayed; sending it again simply works, and is in the conversation once."""

    undeliver = ResendTest.undeliver

    def setUp(self) -> None:
        super().setUp()
        # 200, then the body ends before any token and without the done line.
        self.double.behave("mute", reply="", omit_done=True)

    def test_its_resend_is_answered_and_the_conversation_holds_it_once(self):
        first = self.post_json("/llmchat", chat_body("un", "hello?", model="mute"))
        self.assertEqual(first.code, 200)
        self.assertEqual(parse(first.body)[0][-1].event, "error")
        again = self.post_json("/llmchat", chat_body("un", "hello?"))
        self.assertEqual(again.code, 200)
        self.assertNotIn("X-Chatterd-Replayed", again.headers)
        self.assertEqual(contents(self.double.chat_requests()[-1].body["messages"]), [("user", "hello?")])
        self.assertEqual(self.post_json("/llmchat", chat_body("un", "and then?")).code, 200)
        sent = self.double.chat_requests()[-1].body["messages"]
        self.assertEqual([m["content"] for m in sent][::2], ["hello?", "and then?"])
        self.assertEqual(shape_problems(sent), [])
        turns = self.io_loop.run_sync(lambda: self.turns("un"))
        self.assertEqual([(t["status"], t["unanswered"]) for t in turns],
                         [("failed", True), ("complete", False), ("complete", False)])
        self.assertIn("without its final done message", turns[0]["error"])  # the record keeps why
        self.assertEqual([r["content"] for r in self.rows("un") if r["role"] == "user"],
                         ["hello?", "and then?"])

    def test_an_undelivered_one_is_asked_again_not_replayed(self):
        self.assertEqual(self.post_json("/llmchat", chat_body("uu", "hi", model="mute")).code, 200)
        self.io_loop.run_sync(lambda: self.undeliver("uu"))
        again = self.post_json("/llmchat", chat_body("uu", "hi"))
        self.assertNotIn("X-Chatterd-Replayed", again.headers)
        self.assertEqual(parse(again.body)[0][-1].event, "message")  # done
        self.assertEqual(len(self.double.chat_requests()), 2)
        self.assertEqual([t["status"] for t in self.io_loop.run_sync(lambda: self.turns("uu"))],
                         ["failed", "complete"])

    def test_one_that_failed_after_answer_text_stays_whole(self):
        self.double.behave("breaks", error="model crashed", error_after=2)
        self.assertEqual(self.post_json("/llmchat", chat_body("uw", "go", model="breaks")).code, 200)
        self.assertEqual(self.post_json("/llmchat", chat_body("uw", "again")).code, 200)
        sent = self.double.chat_requests()[-1].body["messages"]
        self.assertEqual([m["role"] for m in sent], ["user", "assistant", "user"])
        self.assertEqual(sent[1]["content"], self.rows("uw")[1]["content"])  # what was said
        self.assertTrue(sent[1]["content"])


class DeliveryRecordTest(ChatterdTestCase):
    @gen_test(timeout=20)
    async def test_deliveries_are_recorded_by_the_next_turn_or_soon_after(self):
        self._app.turns.delivery_flush = 60  # only the next turn, or the explicit flush below
        for app in ("d1", "d2"):
            response = await AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST",
                                                     body=jsonfmt.dumps(chat_body(app, "hi")))
            self.assertEqual(response.code, 200)
        # d1's delivery rode on d2's begin_turn; d2's waits for the flush (or the next turn).
        con = await asyncpg.connect(self.dsn())
        try:
            rows = await con.fetch("SELECT appid, delivered FROM chatterd.turns ORDER BY id")
            self.assertEqual([tuple(r) for r in rows], [("d1", True), ("d2", False)])
            await self._app.turns.flush_delivered()
            rows = await con.fetch("SELECT delivered FROM chatterd.turns ORDER BY id")
            self.assertEqual([r["delivered"] for r in rows], [True, True])
        finally:
            await con.close()


class DeliveredMarksTest(ChatterdTestCase):
    """begin_turn records the deliveries it is handed, a few one by one and many as a set
    (db/functions/begin_turn.sql): every one marked, and a turn row another transaction holds
    skipped rather than waited for, either way."""

    async def ended_turns(self, n: int, prefix: str) -> list[int]:
        ids = []
        for k in range(n):
            turn = (await conversations.begin_turn(self.pool, ANONYMOUS, f"{prefix}-{k}", "me", 10,
                                                   [{"role": "user", "content": "u"}]))[0]
            await conversations.end_turn(self.pool, ANONYMOUS, turn, "complete", None,
                                         conversations.Reply(content="a"))
            ids.append(turn)
        return ids

    async def delivered(self, ids: list[int]) -> list[bool]:
        rows = await self.pool.fetch("SELECT id, delivered FROM chatterd.turns"
                                     " WHERE id = ANY($1::bigint[]) ORDER BY id", ids)
        return [r["delivered"] for r in rows]

    async def begin_with(self, app_id: str, delivered: list[int]) -> None:
        turn = (await asyncio.wait_for(conversations.begin_turn(
            self.pool, ANONYMOUS, app_id, "me", 10, [{"role": "user", "content": "next"}],
            delivered=[(ANONYMOUS, i) for i in delivered]), 5))[0]  # a wait on a held row times out
        await conversations.end_turn(self.pool, ANONYMOUS, turn, "complete", None,
                                     conversations.Reply(content="b"))

    @gen_test(timeout=30)
    async def test_every_delivery_is_marked_and_a_held_row_is_skipped(self):
        for count in (2, 4, 5, 12):  # ids handed: one by one up to 4, as a set beyond
            with self.subTest(count=count):
                ids = await self.ended_turns(count, f"dm{count}")
                holder = await asyncpg.connect(self.dsn())
                try:
                    async with holder.transaction():
                        await holder.execute("SELECT 1 FROM chatterd.turns WHERE id = $1"
                                             " FOR UPDATE", ids[0])
                        await self.begin_with(f"dm{count}-next", ids)
                finally:
                    await holder.close()
                self.assertEqual(await self.delivered(ids), [False] + [True] * (count - 1))
                await self.begin_with(f"dm{count}-after", ids[:1])  # not held now: marked
                self.assertEqual(await self.delivered(ids), [True] * count)

    @gen_test(timeout=20)
    async def test_odd_lists_mark_exactly_the_turns_they_name(self):
        """As begin_turn's SQL takes them: empty, NULL ids, repeated ids, either form."""
        ids = await self.ended_turns(7, "dm-odd")
        for n, handed in enumerate(([], [None], [ids[0], ids[0], None],  # one by one
                                    [None, ids[1], ids[1], ids[2], None, ids[2]])):  # as a set
            turn = await self.pool.fetchval(
                "SELECT turn_id FROM begin_turn(0, $1, 'me', 10, $2::jsonb, p_delivered => $3,"
                " p_delivered_owners => $4)",
                f"dm-odd-next{n}", [{"role": "user", "content": "next"}], handed,
                [ANONYMOUS] * len(handed))
            await conversations.end_turn(self.pool, ANONYMOUS, turn, "complete", None,
                                         conversations.Reply(content="b"))
        self.assertEqual(await self.delivered(ids), [True] * 3 + [False] * 4)


class ReleasedLeaseTest(ChatterdTestCase):
    @gen_test(timeout=20)
    async def test_renewing_never_revives_a_released_lease(self):
        done = await conversations.begin_turn(self.pool, ANONYMOUS, "rel", "me", 10,
                                              [{"role": "user", "content": "u"}])
        await conversations.end_turn(self.pool, ANONYMOUS, done[0], "complete", None,
                                     conversations.Reply(content="a"))
        running = await conversations.begin_turn(self.pool, ANONYMOUS, "other", "me", 10,
                                                 [{"role": "user", "content": "u"}])
        self.assertEqual(await conversations.renew_leases(self.pool, "me", 10,
                                                          [(ANONYMOUS, running[0])]), 1)
        # Another process can take "rel" at once: its lease was released, not renewed.
        taken = await conversations.begin_turn(self.pool, ANONYMOUS, "rel", "them", 10,
                                               [{"role": "user", "content": "v"}])
        self.assertIsNotNone(taken[0])
        await conversations.end_turn(self.pool, ANONYMOUS, running[0], "complete", None,
                                     conversations.Reply(content="b"))


class LeaseOfAFailedEndTest(ChatterdTestCase):
    @gen_test(timeout=20)
    async def test_a_turn_whose_end_failed_is_not_kept_alive_by_renewal(self):
        """Its end could not be stored (the database was away): it is no longer running
        here, so its lease is left to expire even while other turns keep renewing."""
        keeper = self._app.turns
        stuck = await keeper.begin(ANONYMOUS, "stuck", [{"role": "user", "content": "u"}])
        live = await keeper.begin(ANONYMOUS, "live", [{"role": "user", "content": "u"}])
        keeper._turn_ended(stuck)  # what Turn.end does however the store went

        async def expiry(app_id):
            con = await asyncpg.connect(self.dsn())
            try:
                return await con.fetchval("SELECT expires_at FROM chatterd.leases WHERE appid = $1",
                                          app_id)
            finally:
                await con.close()

        before = {app: await expiry(app) for app in ("stuck", "live")}
        self.assertEqual(keeper.running, {(ANONYMOUS, live.id)})
        self.assertEqual(await conversations.renew_leases(self.pool, keeper.owner, 10,
                                                          list(keeper.running)), 1)
        self.assertEqual(await expiry("stuck"), before["stuck"])
        self.assertGreater(await expiry("live"), before["live"])
        await live.end("complete", conversations.Reply(content="a"))


class DoubleSendTest(ChatterdTestCase):
    @gen_test(timeout=30)
    async def test_a_double_send_is_one_turn_and_both_get_its_answer(self):
        """The same message sent twice at once (a double tap): the second waits for the first
        and is answered from its storage, so the model is asked once and it is stored once."""
        self.double.behave("slow", token_delay=0.02, reply="one two three four five")
        body = jsonfmt.dumps(chat_body("tap", "hello?", model="slow"))
        first = AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST", body=body)
        await self.double.wait_for_chats(1)
        second = await AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST", body=body)
        first = await first
        texts = []
        for response in (first, second):
            events, _ = parse(response.body)
            self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
            texts.append("".join(jsonfmt.loads(e.data)["message"]["content"] for e in events))
        self.assertEqual(texts[0], texts[1])
        self.assertIn("X-Chatterd-Replayed", second.headers)
        self.assertEqual(len(self.double.chat_requests()), 1)
        self.assertEqual([(r["role"], r["content"]) for r in await self.conversation("tap")],
                         [("user", "hello?"), ("assistant", texts[0])])

    @gen_test(timeout=30)
    async def test_a_different_message_sent_meanwhile_is_its_own_turn(self):
        self.double.behave("slow", token_delay=0.02, reply="one two three four five")
        first = AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST",
                                        body=jsonfmt.dumps(chat_body("tap2", "hello?", model="slow")))
        await self.double.wait_for_chats(1)
        second = await AsyncHTTPClient().fetch(self.get_url("/llmchat"), method="POST",
                                               body=jsonfmt.dumps(chat_body("tap2", "and?", model="slow")))
        await first
        self.assertNotIn("X-Chatterd-Replayed", second.headers)
        self.assertEqual(len(self.double.chat_requests()), 2)
        self.assertEqual([r["content"] for r in await self.conversation("tap2") if r["role"] == "user"],
                         ["hello?", "and?"])


class CutWarningTest(AsyncTestCase):
    """An upstream that cuts (or under-counts) every prompt gets one warning a minute, not a
    log line per turn (the metric counts each; test_context covers the cut itself)."""

    @gen_test
    async def test_warned_once_per_interval_with_the_count_since(self) -> None:
        # warn_cut needs no database
        keeper = TurnKeeper(None, settings.defaults())  # type: ignore[arg-type]
        turn = Turn(keeper, ANONYMOUS, "cut-app", 7, [])
        with self.assertLogs("chatterd", "WARNING") as logs:
            for _ in range(3):
                keeper.warn_cut(turn, 3)
        self.assertEqual(len(logs.output), 1)
        self.assertIn("turn 7 of appID 'cut-app': Ollama counted 3 prompt tokens", logs.output[0])
        keeper._cut_warned_at -= CUT_WARNING_EVERY  # a minute later
        with self.assertLogs("chatterd", "WARNING") as logs:
            keeper.warn_cut(turn, 3)
            keeper.warn_cut(turn, 3)
        self.assertEqual(len(logs.output), 1)
        self.assertIn("(2 more such turns since the last warning)", logs.output[0])


class FlagTest(AsyncTestCase):
    """handlers.base.Flag, the client-left signal a queued turn waits on."""

    @gen_test
    async def test_a_wait_ends_when_the_flag_is_set_and_a_cancelled_wait_harms_nothing(self):
        from handlers.base import Flag
        flag = Flag()
        self.assertFalse(flag.is_set())
        cancelled = asyncio.ensure_future(flag.wait())
        await asyncio.sleep(0)
        cancelled.cancel()  # as TurnKeeper.begin does after each pause
        waiting = asyncio.ensure_future(flag.wait())
        await asyncio.sleep(0)
        self.assertFalse(waiting.done())
        flag.set()
        self.assertTrue(await asyncio.wait_for(waiting, 5))
        self.assertTrue(flag.is_set())
        self.assertTrue(await flag.wait())  # set already: at once
        self.assertTrue(cancelled.cancelled())

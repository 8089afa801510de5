"""Long conversations (docs/turn-contract.md, "Long conversations"): each turn sends
the system prompts, the newest whole turns that fit the budget and its own messages; says
what it left out; learns token counts from Ollama; reads what the budget needs, not the
whole conversation."""

import math
import re
import time

import asyncpg

import jsonfmt
from db import conversations
from db.conversations import ANONYMOUS, Reply
from tests.ollama_double import message_tokens, prompt_tokens
from tests.sse_parser import parse
from tests.support import ChatterdTestCase, chat_body

CONTEXT = 400
BUDGET = CONTEXT - CONTEXT // 4  # no num_predict: a quarter is kept for the reply


def estimate(content: str) -> int:
    """db/functions/estimate_tokens.sql, for text without tool calls."""
    return 4 + math.ceil(len(content.encode()) / 4)


def expected_window(rows, new_tokens: int, budget: int):
    """The oracle: (system rows, the newest whole turns that fit, the rows left out), from
    the stored conversation before the turn."""
    system = [r for r in rows if r["role"] == "system"]
    turns: dict[int, list] = {}
    for r in rows:
        if r["role"] != "system":
            turns.setdefault(r["turn_id"], []).append(r)
    left = budget - sum(r["ntokens"] for r in system) - new_tokens
    sent: list = []
    for turn_id in sorted(turns, reverse=True):
        cost = sum(r["ntokens"] for r in turns[turn_id])
        if cost > left:
            break
        left -= cost
        sent = turns[turn_id] + sent
    omitted = [r for r in rows if r["role"] != "system" and r not in sent]
    return system, sent, omitted


def describe(sent_n, sent_t, omitted_n, omitted_t, context):
    return (f"sent={sent_n} messages/{sent_t} tokens; "
            f"omitted={omitted_n} messages/{omitted_t} tokens; context={context} tokens")


class ContextTest(ChatterdTestCase):
    settings_overrides = {"context_tokens": CONTEXT}

    def setUp(self):
        super().setUp()
        self.double.behave("llama3.2", reply="Aye.")

    def chat(self, app_id, content, **extra):
        response = self.post_json("/llmchat", chat_body(app_id, content, **extra))
        self.assertEqual(response.code, 200, response.body)
        events, comments = parse(response.body)
        self.assertEqual(jsonfmt.loads(events[-1].data)["done"], True)
        return response, comments

    def prep(self, app_id, system="You are a terse pirate."):
        response = self.post_json("/llmprep", {"appID": app_id, "model": "llama3.2",
                                               "messages": [{"role": "system", "content": system}]})
        self.assertEqual(response.code, 200)

    def sent_upstream(self, index=-1):
        return self.double.chat_requests()[index].body

    def test_a_long_conversation_sends_system_prompt_and_newest_whole_turns(self):
        self.prep("long")
        for i in range(12):
            self.chat("long", f"message {i}: " + "word " * 20)
        before = self.rows("long")
        new = "and now? " + "word " * 20
        response, comments = self.chat("long", new)
        system, sent, omitted = expected_window(before, estimate(new), BUDGET)
        self.assertTrue(omitted and sent, "the conversation should exceed the budget")
        body = self.sent_upstream()
        self.assertEqual(body["messages"],
                         [{"role": r["role"], "content": r["content"]} for r in system + sent]
                         + [{"role": "user", "content": new}])
        self.assertEqual(body["messages"][1]["role"], "user")  # a whole turn comes first
        self.assertEqual(body["options"], {"num_ctx": CONTEXT})  # Ollama's window is ours
        self.assertNotIn("truncate", body)
        # The header and the stream's first line say the same, with the stored counts.
        sent_tokens = sum(r["ntokens"] for r in system + sent) + estimate(new)
        header = describe(len(system + sent) + 1, sent_tokens, len(omitted),
                          sum(r["ntokens"] for r in omitted), CONTEXT)
        self.assertEqual(response.headers["X-Chatterd-Context"], header)
        self.assertTrue(response.body.startswith(b": context " + header.encode() + b"\n\n"))
        self.assertEqual(comments[0], "context " + header)
        self.assertLessEqual(sent_tokens, BUDGET)
        # Ollama never had to cut anything, on any turn.
        self.assertEqual([r.truncated for r in self.double.chat_requests()], [0] * 13)
        # Counted in /metrics.
        text = self.fetch("/metrics").body.decode()
        self.assertIn("chatterd_context_cut_turns_total", text)
        cut = [line for line in text.splitlines()
               if line.startswith("chatterd_context_omitted_messages_total ")]
        self.assertTrue(cut and float(cut[0].split()[1]) >= len(omitted))

    def test_the_access_log_says_what_was_left_out(self):
        self.prep("logged")
        for i in range(8):
            self.chat("logged", "word " * 40)
        with self.assertLogs("chatterd.access") as logs:
            response, _ = self.chat("logged", "last")
        header = response.headers["X-Chatterd-Context"]
        self.assertIn("omitted=", header)
        self.assertNotIn("omitted=0 ", header)
        self.assertIn(f"context={header!r}", logs.output[-1])

    def test_a_short_conversation_omits_nothing(self):
        self.prep("short")
        self.chat("short", "hello")
        response, _ = self.chat("short", "again")
        header = response.headers["X-Chatterd-Context"]
        self.assertIn("sent=4 messages/", header)
        self.assertIn("omitted=0 messages/0 tokens", header)
        self.assertEqual(len(self.sent_upstream()["messages"]), 4)

    def test_num_ctx_in_the_request_sets_the_budget(self):
        self.prep("ctx")
        for i in range(10):
            self.chat("ctx", "word " * 30)
        response, _ = self.chat("ctx", "big window", options={"num_ctx": 4000})
        self.assertIn("omitted=0 messages", response.headers["X-Chatterd-Context"])
        self.assertEqual(len(self.sent_upstream()["messages"]), 1 + 20 + 1)
        self.assertEqual(self.sent_upstream()["options"], {"num_ctx": 4000})  # as given
        before = self.rows("ctx")
        response, _ = self.chat("ctx", "small window", options={"num_ctx": 200, "seed": 1})
        system, sent, omitted = expected_window(before, estimate("small window"), 150)
        self.assertEqual(len(self.sent_upstream()["messages"]), len(system + sent) + 1)
        self.assertEqual(self.sent_upstream()["options"], {"num_ctx": 200, "seed": 1})
        self.assertIn("context=200 tokens", response.headers["X-Chatterd-Context"])
        # num_predict is the room kept for the reply.
        before = self.rows("ctx")
        self.chat("ctx", "room", options={"num_ctx": 400, "num_predict": 350})
        system, sent, omitted = expected_window(before, estimate("room"), 50)
        self.assertEqual(len(self.sent_upstream()["messages"]), len(system + sent) + 1)

    def test_bad_num_ctx_is_refused(self):
        for options, message in (({"num_ctx": "big"}, "options.num_ctx must be an integer"),
                                 ({"num_ctx": 0}, "options.num_ctx must be a positive integer"),
                                 ({"num_predict": 1.5}, "options.num_predict must be an integer")):
            response = self.post_json("/llmchat", chat_body("bad", "hi", options=options))
            self.assertEqual(response.code, 422)
            self.assertEqual(jsonfmt.loads(response.body), {"error": message})

    def test_a_message_larger_than_the_budget_is_still_sent_with_the_system_prompt(self):
        self.prep("huge")
        self.chat("huge", "hello")
        huge = "word " * 1000  # about 1000 tokens, more than the whole context
        response, _ = self.chat("huge", huge)
        self.assertEqual(self.sent_upstream()["messages"],
                         [{"role": "system", "content": "You are a terse pirate."},
                          {"role": "user", "content": huge}])
        self.assertIn("sent=2 messages/", response.headers["X-Chatterd-Context"])
        self.assertIn("omitted=2 messages/", response.headers["X-Chatterd-Context"])
        # That big turn never fits later, and ends the walk back: the older turn behind it
        # is left out too (what is sent is always the newest, contiguous).
        response, _ = self.chat("huge", "small")
        self.assertEqual([m["content"] for m in self.sent_upstream()["messages"]],
                         ["You are a terse pirate.", "small"])
        self.assertIn("omitted=4 messages/", response.headers["X-Chatterd-Context"])

    def test_a_tool_call_is_never_separated_from_its_result(self):
        app = "tools"
        self.prep(app)
        self.chat(app, "word " * 30)
        pool, owner = self.pool, "test"

        async def tool_call_turn():  # the turn that ended with a call of the client's tool
            turn_id, _, _, _ = await conversations.begin_turn(
                pool, ANONYMOUS, app, owner, 10, [{"role": "user", "content": "Weather in Tokyo?"}],
                budget=BUDGET, context=CONTEXT)
            call = [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]
            await conversations.end_turn(pool, ANONYMOUS, turn_id, "complete", None,
                                         Reply("", extra={"tool_calls": call}, tokens=12))

        self.io_loop.run_sync(tool_call_turn)
        # The client ran the tool: its result starts the next turn.
        result = {"role": "tool", "content": "sunny, " + "warm " * 40, "tool_name": "get_weather"}
        response = self.post_json("/llmchat", {"appID": app, "model": "llama3.2",
                                               "messages": [result]})
        self.assertEqual(response.code, 200)
        roles = [m["role"] for m in self.sent_upstream()["messages"]]
        self.assertEqual(roles[-3:], ["user", "assistant", "tool"])
        # Later turns push them out of the budget: both at once, never the result alone.
        contents = []
        for i in range(3):
            self.chat(app, f"more {i} " + "word " * 15)
            sent = self.sent_upstream()["messages"]
            contents.append([m["role"] for m in sent])
            tool_at = [k for k, m in enumerate(sent) if m["role"] == "tool"]
            if tool_at:
                self.assertEqual(sent[tool_at[0] - 1]["role"], "assistant")
                self.assertIn("tool_calls", sent[tool_at[0] - 1])
            if sent[1]["role"] == "tool":
                self.fail(f"a tool result was sent without its call: {contents}")
        # A budget that holds the result's turn and those after it, but not the call's turn:
        # then neither is sent.
        rows = self.rows(app)
        call_turn = next(r["turn_id"] for r in rows if r["extra"] and "tool_calls" in r["extra"])
        system = sum(r["ntokens"] for r in rows if r["role"] == "system")
        after = sum(r["ntokens"] for r in rows if r["turn_id"] > call_turn)
        call = sum(r["ntokens"] for r in rows if r["turn_id"] == call_turn)
        budget = system + after + call + estimate("next") - 1
        self.chat(app, "next", options={"num_ctx": budget + 100, "num_predict": 100})
        sent = self.sent_upstream()["messages"]
        self.assertNotIn("tool", [m["role"] for m in sent])
        self.assertEqual(len(sent), 1 + sum(1 for r in rows if r["turn_id"] > call_turn + 1) + 1)
        # One token more, and both are sent.
        rows = self.rows(app)
        after = sum(r["ntokens"] for r in rows if r["turn_id"] > call_turn)
        budget = system + after + call + estimate("next")
        self.chat(app, "next", options={"num_ctx": budget + 100, "num_predict": 100})
        roles = [m["role"] for m in self.sent_upstream()["messages"]]
        self.assertEqual(roles[:5], ["system", "user", "assistant", "tool", "assistant"])

    def test_learned_token_counts_replace_estimates(self):
        self.prep("learn", "Be brief.")
        self.chat("learn", "What is the capital of France?")
        rows = self.rows("learn")
        first = self.double.chat_requests()[0]
        done = jsonfmt.loads(first.lines_sent[-1])
        # The first prompt's count is shared by the system prompt and the question ...
        self.assertEqual([r["ntokens_from"] for r in rows], ["shared", "shared", "ollama"])
        self.assertEqual(rows[0]["ntokens"] + rows[1]["ntokens"], done["prompt_eval_count"])
        self.assertEqual(rows[0]["ntokens"] + rows[1]["ntokens"],
                         prompt_tokens(first.body["messages"]))
        self.assertEqual(rows[2]["ntokens"], done["eval_count"])  # the reply: eval_count
        # ... and the next turn's new message gets exactly what its prompt added.
        question = "And of Spain, " + "please " * 10
        response, _ = self.chat("learn", question)
        # The header counted the learned numbers: the first prompt, the reply, an estimate.
        self.assertIn(f"sent=4 messages/{done['prompt_eval_count'] + done['eval_count'] + estimate(question)} tokens",
                      response.headers["X-Chatterd-Context"])
        second = self.double.chat_requests()[1]
        done2 = jsonfmt.loads(second.lines_sent[-1])
        rows = self.rows("learn")
        self.assertEqual(rows[3]["ntokens_from"], "ollama")
        self.assertEqual(rows[3]["ntokens"],
                         done2["prompt_eval_count"] - done["prompt_eval_count"] - done["eval_count"])
        self.assertNotEqual(rows[3]["ntokens"], estimate(question))
        # The double's arithmetic: the new message plus the previous reply's template.
        self.assertEqual(rows[3]["ntokens"], message_tokens({"content": question}) + 4)
        # Invariant: what a turn sent adds up to Ollama's count for it.
        self.assertEqual(sum(r["ntokens"] for r in rows[:4]), done2["prompt_eval_count"])

    def test_counts_are_not_learned_from_a_cut_prompt(self):
        # A client that claims a context far larger than the model's: Ollama (the double)
        # cuts the prompt and reports the smaller count.  chatterd notices, says so, and
        # learns nothing from that count.
        self.prep("cut")
        for i in range(3):
            self.chat("cut", "word " * 30)
        self.double.behave("small", reply="Aye.", max_ctx=100)
        cut_before = self.upstream_cuts()
        with self.assertLogs("chatterd", "WARNING") as logs:
            self.chat("cut", "word " * 30, model="small", options={"num_ctx": 100000})
        self.assertGreater(self.double.chat_requests()[-1].truncated, 0)
        self.assertIn("fewer than were sent", "\n".join(logs.output))
        rows = self.rows("cut")
        self.assertEqual(rows[-2]["ntokens_from"], "estimate")  # the new message: not learned
        turns = self.io_loop.run_sync(lambda: self.turns("cut"))
        self.assertEqual(turns[-1]["status"], "complete")
        self.assertIn("it may have cut the prompt", turns[-1]["error"])
        self.assertEqual(self.upstream_cuts(), cut_before + 1)  # (the counter is process-wide)

    def upstream_cuts(self) -> float:
        text = self.fetch("/metrics").body.decode()
        found = re.search(r"^chatterd_context_upstream_cut_total (\S+)$", text, re.M)
        self.assertIsNotNone(found)
        return float(found.group(1))


class BoundedReadTest(ChatterdTestCase):
    """The history read's cost depends on the budget, not the conversation's length."""

    def seed(self, app_id: str, messages: int) -> None:
        async def go():
            con = await asyncpg.connect(self.dsn(), server_settings={"search_path": "chatterd"})
            try:
                await seed_conversation(con, app_id, messages)
            finally:
                await con.close()
        self.io_loop.run_sync(go)

    async def buffers(self, *app_ids: str) -> list[int]:
        """Shared buffers begin_turn touches for each appID (rolled back), on a connection
        that has run it once already (the first call also reads the catalog)."""
        con = await asyncpg.connect(self.dsn(), server_settings={"search_path": "chatterd"})
        counts = []
        try:
            for app_id in (app_ids[0],) + app_ids:
                tx = con.transaction()
                await tx.start()
                plan = await con.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM begin_turn(0, $1, 'x',"
                    " 10, '[{\"role\": \"user\", \"content\": \"hi\"}]'::jsonb, false, 6144,"
                    " 8192)", app_id)
                await tx.rollback()
                node = jsonfmt.loads(plan)[0]["Plan"]
                counts.append(node["Shared Hit Blocks"] + node["Shared Read Blocks"])
        finally:
            await con.close()
        return counts[1:]

    def test_begin_turn_reads_what_the_budget_needs_not_the_conversation(self):
        self.seed("tiny", 10)
        self.seed("full", 300)  # about what the budget holds (6144 tokens: ~100 turns)
        self.seed("big", 100_000)
        tiny, full, big = self.io_loop.run_sync(lambda: self.buffers("tiny", "full", "big"))
        print(f"begin_turn buffers: 10 messages {tiny}, 300 messages {full}, "
              f"100000 messages {big}")
        self.assertLess(big, full * 1.5 + 20)  # the length past the budget costs nothing
        self.assertLess(big, 20 * tiny)

    def test_the_walk_uses_the_indexes(self):
        self.seed("big", 20_000)

        async def plans():
            con = await asyncpg.connect(self.dsn(), server_settings={"search_path": "chatterd"})
            try:
                await con.execute("ANALYZE turns; ANALYZE messages")
                walk = await con.fetch(
                    "EXPLAIN SELECT t.id, t.tokens FROM turns t WHERE t.owner_id = 0 AND t.appid = 'big'"
                    " AND t.id < 9223372036854775807"
                    " AND t.status IN ('complete', 'interrupted', 'failed') ORDER BY t.id DESC"
                    " LIMIT 32")
                system = await con.fetch(
                    "EXPLAIN SELECT m.seq FROM messages m WHERE m.owner_id = 0 AND m.appid = 'big'"
                    " AND m.role = 'system' AND m.turn_id < 9223372036854775807")
                return "\n".join(r[0] for r in walk), "\n".join(r[0] for r in system)
            finally:
                await con.close()

        walk, system = self.io_loop.run_sync(plans)
        self.assertIn("Index Scan Backward using turns_", walk)  # appid's index, or the pkey
        self.assertNotIn("Sort", walk)
        self.assertIn("messages_system", system)

    def test_a_turn_on_a_100000_message_conversation(self):
        self.seed("big", 100_000)
        started = time.monotonic()
        response = self.post_json("/llmchat", chat_body("big", "still there?"))
        elapsed = time.monotonic() - started
        self.assertEqual(response.code, 200)
        header = response.headers["X-Chatterd-Context"]
        sent = self.double.chat_requests()[-1].body["messages"]
        self.assertEqual(sent[0]["role"], "system")
        self.assertLess(len(sent), 300)
        self.assertIn(f"sent={len(sent)} messages/", header)
        stored = 1 + 2 * ((100_000 - 1) // 2)
        self.assertIn(f"omitted={stored - (len(sent) - 1)} messages/", header)
        print(f"a turn on 100000 messages: {1000 * elapsed:.1f} ms; {header}")
        rows = self.rows("big")  # the turn is stored, the sizes kept
        self.assertEqual(len(rows), stored + 2)


async def seed_conversation(con, app_id: str, messages: int) -> None:
    """A system prompt and messages-1 more, as (messages-1)/2 ended turns of a question and
    a reply, in a few statements (generate_series)."""
    pairs = (messages - 1) // 2
    await con.execute("""
        WITH t AS (INSERT INTO turns (appid, status, ended_at, tokens, nmessages)
                   SELECT $1, 'complete', now(), 0, 0 RETURNING id)
        INSERT INTO messages (appid, turn_id, role, content, ntokens)
        SELECT $1, id, 'system', 'You are a terse pirate.', 10 FROM t""", app_id)
    await con.execute("""
        WITH t AS (INSERT INTO turns (appid, status, ended_at, tokens, nmessages)
                   SELECT $1, 'complete', now(), 60, 2 FROM generate_series(1, $2) RETURNING id)
        INSERT INTO messages (appid, turn_id, role, content, ntokens, tokens)
        SELECT $1, t.id, r.role,
               CASE WHEN r.k = 1 THEN 'Question number ' || t.id || ' about the sea and ships?'
                    ELSE 'Answer ' || t.id || ': the sea is wide and ships are slow.' END,
               30, CASE WHEN r.k = 2 THEN 26 END
          FROM t, (VALUES (1, 'user'), (2, 'assistant')) AS r(k, role)
         ORDER BY t.id, r.k""", app_id, pairs)
    await con.execute("""
        INSERT INTO conversation_sizes (appid, messages, tokens)
        SELECT $1, count(*), sum(ntokens) FROM messages WHERE appid = $1
        ON CONFLICT (owner_id, appid)
        DO UPDATE SET messages = EXCLUDED.messages, tokens = EXCLUDED.tokens""",
                      app_id)
    await con.execute("ANALYZE turns; ANALYZE messages")  # as autovacuum would, after a load

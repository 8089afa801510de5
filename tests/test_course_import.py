"""Adopting a course server's database: the real `python chatterd.py` started on a database
that the course's own SQL built and filled (both variants, and the benchmark's layout)."""

import asyncio
import datetime
import os
import sys
import uuid

import asyncpg
from tornado.testing import AsyncTestCase, gen_test

import jsonfmt
import settings
from db import conversations, pool as db_pool
from db.conversations import ANONYMOUS, Reply
from tests.message_shape import shape_problems
from tests.ollama_double import OllamaDouble, default_reply
from tests.support import fresh_database
from tests.test_migrations import TEN_MIGRATIONS, release_database, upgrade, versions_after
from tests.test_process import ROOT, curl, start_chatterd, stop, unused_port

# The course's SQL.  Its chatter page creates chatts (the exact DDL is not published; this
# is the layout its handlers and `SELECT * FROM chatts` show), llmChat adds appID, llmTools
# adds the two JSON text columns.  The older course spells the role column `username`.
NEWER = ["CREATE TABLE chatts (name varchar(255), message text, id uuid,"
         " time timestamp DEFAULT CURRENT_TIMESTAMP)",
         "ALTER TABLE chatts ADD COLUMN appID VARCHAR(64)",
         "ALTER TABLE chatts ADD COLUMN toolcalls TEXT",
         "ALTER TABLE chatts ADD COLUMN toolschemas TEXT"]
OLDER = ["CREATE TABLE chatts (username varchar(255), message varchar(255), id uuid,"
         " time timestamp DEFAULT CURRENT_TIMESTAMP)",
         "ALTER TABLE chatts ADD COLUMN appID VARCHAR(155)"]
BENCH = ["CREATE TABLE IF NOT EXISTS chatts (name varchar(255), message text, id uuid,"
         " time timestamp DEFAULT now(), appid varchar(155))",
         "CREATE INDEX IF NOT EXISTS chatts_appid_time ON chatts (appid, time)"]

WEATHER_SCHEMA = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current temperature",
    "parameters": {"type": "object", "properties": {"lat": {"type": "number"},
                                                    "lon": {"type": "number"}},
                   "required": ["lat", "lon"]}}}]
TOOL_CALLS = [{"function": {"name": "get_weather", "arguments": {"lat": 42.28, "lon": -83.74}}}]


def descending_ids(n: int) -> list[str]:
    """Ids for rows whose times tie, sorting the opposite way of their insertion, so ordering
    ties by id would visibly fail (the course's handlers use gen_random_uuid())."""
    return sorted((str(uuid.uuid4()) for _ in range(n)), reverse=True)


class Course:
    """The course's handlers, as SQL on the course's table (`role_column` is name or username)."""

    def __init__(self, con: asyncpg.Connection, role_column: str = "name") -> None:
        self.con = con
        self.role = role_column

    async def postchatt(self, name: str, message: str) -> None:
        await self.con.execute(f"INSERT INTO chatts ({self.role}, message, id)"
                               " VALUES ($1, $2, gen_random_uuid())", name, message)

    async def llmprep(self, app_id: str, system: str) -> None:
        async with self.con.transaction():
            await self.con.execute("DELETE FROM chatts WHERE appid = $1", app_id)
            await self.con.execute(f"INSERT INTO chatts ({self.role}, message, id, appid)"
                                   " VALUES ('system', $1, gen_random_uuid(), $2)", system, app_id)

    async def llmchat(self, app_id: str, messages: list[tuple[str, str]], reply: str | None = None,
                      toolschemas: str | None = None) -> None:
        """One request: its messages in one transaction (their times tie), then the reply."""
        async with self.con.transaction():
            for (role, content), row_id in zip(messages, descending_ids(len(messages))):
                if toolschemas is not None:
                    await self.con.execute(
                        f"INSERT INTO chatts ({self.role}, message, id, appid, toolschemas)"
                        " VALUES ($1, $2, $3, $4, $5)", role, content, row_id, app_id, toolschemas)
                    toolschemas = None  # the course stores them with the first message only
                else:
                    await self.con.execute(f"INSERT INTO chatts ({self.role}, message, id, appid)"
                                           " VALUES ($1, $2, $3, $4)", role, content, row_id, app_id)
        if reply is not None:
            await self.con.execute(f"INSERT INTO chatts ({self.role}, message, id, appid)"
                                   " VALUES ('assistant', $1, gen_random_uuid(), $2)", reply, app_id)

    async def tool_round(self, app_id: str, toolcalls: str, result: str) -> None:
        await self.con.execute("INSERT INTO chatts (name, message, id, appid, toolcalls)"
                               " VALUES ('assistant', '', gen_random_uuid(), $1, $2)", app_id, toolcalls)
        await self.con.execute("INSERT INTO chatts (name, message, id, appid)"
                               " VALUES ('tool', $1, gen_random_uuid(), $2)", result, app_id)

    async def board(self) -> list[list[str]]:
        """The board as /getchatts shows it: [name, message, id, time], oldest first."""
        rows = await self.con.fetch(f"SELECT {self.role} AS name, message, id, time::timestamptz AS t"
                                    " FROM chatts WHERE appid IS NULL ORDER BY time")
        return [[r["name"], r["message"], str(r["id"]), r["t"]] for r in rows]

    async def snapshot(self) -> tuple:
        """Everything about the course table that the import must leave as it is."""
        columns = await self.con.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'public.chatts'::regclass AND attnum > 0 ORDER BY attnum")
        rows = await self.con.fetch("SELECT ctid::text, * FROM public.chatts ORDER BY ctid")
        return [tuple(c) for c in columns], [tuple(r) for r in rows]


def as_board(rows: list) -> list:
    """/getchatts rows with their times parsed, to compare with the course's."""
    return [[n, m, i, datetime.datetime.fromisoformat(t)] for n, m, i, t in rows]


async def run_chatterd(*args: str) -> tuple[int, str]:
    """Run chatterd to its end (a command, or a start-up that fails); (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "chatterd.py", *args, cwd=ROOT,
        env={**os.environ, "CHATTERD_PORT": str(unused_port())},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, err.decode()


def estimate_tokens(message: dict) -> int:
    """chatterd's estimate of a message's tokens before a model has counted it (see the
    context budget in the turn contract): 4, plus one per 4 bytes of UTF-8."""
    return 4 + -(-len(message["content"].encode()) // 4)


def import_lines(log: list[str]) -> list[str]:
    return [line for line in log if "imported the course's" in line]


class DatabaseTestCase(AsyncTestCase):
    """Connections made with `await self.connect(dsn)` are closed after the test."""

    def setUp(self) -> None:
        super().setUp()
        self.connections: list[asyncpg.Connection] = []

    async def connect(self, dsn: str) -> asyncpg.Connection:
        self.connections.append(await asyncpg.connect(dsn))
        return self.connections[-1]

    def tearDown(self) -> None:
        for con in self.connections:
            self.io_loop.run_sync(con.close)
        super().tearDown()


class CourseImportTest(DatabaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.double = OllamaDouble()
        self.double.listen()

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.double.stop)
        super().tearDown()

    async def start(self, dsn: str):
        proc, port = await start_chatterd("--database-url", dsn, "--ollama-url", self.double.url)
        return proc, f"http://127.0.0.1:{port}"

    async def chat(self, base: str, app_id: str, content: str) -> list[dict]:
        """One /llmchat turn; the messages the double received for it."""
        before = len(self.double.chat_requests())
        await curl("-N", "-X", "POST", f"{base}/llmchat", "-d", jsonfmt.dumps(
            {"appID": app_id, "model": "llama3.2", "stream": True,
             "messages": [{"role": "user", "content": content}]}))
        requests = await self.double.wait_for_chats(before + 1)
        return requests[before].body["messages"]

    async def getchatts(self, base: str) -> list:
        return as_board(jsonfmt.loads(await curl(f"{base}/getchatts")))

    @gen_test(timeout=180)
    async def test_newer_course_with_tools_imported_once_then_new_rows_on_request(self):
        dsn = await fresh_database("course_new", NEWER)
        con = await self.connect(dsn)
        course = Course(con)
        await course.postchatt("ishmael", "Call me Ishmael.")
        await course.postchatt("queequeg", "  spaced\n  out  ")
        # Posted last but timed first: the board follows `time`, not physical order.
        await con.execute("INSERT INTO chatts (name, message, id, time) VALUES"
                          " ('ahab', 'first by time', gen_random_uuid(), now() - interval '1 hour')")
        tools, other = "edu.umich.tools", "edu.umich.other"
        await course.llmprep(tools, "You are terse.")
        await course.llmchat(tools, [("user", "What's the weather?"), ("user", "In Ann Arbor.")],
                             toolschemas=jsonfmt.dumps(WEATHER_SCHEMA))
        await course.tool_round(tools, jsonfmt.dumps(TOOL_CALLS), '{"temperature": 21}')
        await course.llmchat(tools, [], reply="It is 21 degrees.")
        # A role Ollama does not know (the older course stored model names): skipped, counted.
        await con.execute("INSERT INTO chatts (name, message, id, appid)"
                          " VALUES ('llama3.2', 'by a model name', gen_random_uuid(), $1)", tools)
        # Four tied rows in one transaction (ids sorted against their insertion order).
        await course.llmchat(other, [("system", "S"), ("user", "one"), ("assistant", "two"),
                                     ("user", "three")], reply="four")
        board = await course.board()
        before = await course.snapshot()

        proc, base = await self.start(dsn)
        try:
            self.assertEqual(await self.getchatts(base), board)
            self.assertEqual([r[0] for r in board], ["ahab", "ishmael", "queequeg"])
            expected_tools = [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What's the weather?"},
                {"role": "user", "content": "In Ann Arbor."},
                {"role": "assistant", "content": "", "tool_calls": TOOL_CALLS},
                {"role": "tool", "content": '{"temperature": 21}'},
                {"role": "assistant", "content": "It is 21 degrees."}]
            new = {"role": "user", "content": "and tomorrow?"}
            self.assertEqual(await self.chat(base, tools, "and tomorrow?"), expected_tools + [new])
            self.assertEqual(await self.chat(base, other, "five"), [
                {"role": "system", "content": "S"}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"},
                {"role": "assistant", "content": "four"}, {"role": "user", "content": "five"}])
        finally:
            await stop(proc)
        [line] = import_lines(proc.log)
        self.assertIn("3 board post(s), 11 message(s) in 2 appID(s) as 3 turn(s), tool schemas of 1 appID(s);"
                      " skipped 1 row(s) (role 'llama3.2': 1)", line)
        self.assertEqual(await course.snapshot(), before)  # the course table is untouched
        self.assertEqual(jsonfmt.loads(await con.fetchval(
            "SELECT schemas::text FROM chatterd.tool_schemas WHERE appid = $1", tools)), WEATHER_SCHEMA)

        # A second start imports nothing.
        proc, base = await self.start(dsn)
        try:
            self.assertEqual(await self.getchatts(base), board)
            history = await self.chat(base, tools, "still there?")
        finally:
            await stop(proc)
        self.assertEqual(import_lines(proc.log), [])
        reply = {"role": "assistant", "content": default_reply(expected_tools + [new])}
        self.assertEqual(history, expected_tools + [new, reply, {"role": "user", "content": "still there?"}])

        # The course server went on: new rows are imported on request, and only those.
        await course.postchatt("starbuck", "later")
        await course.llmchat(tools, [("user", "Back again.")], reply="Welcome back.")
        await course.llmchat("edu.umich.late", [("user", "hello")])
        board = await course.board()
        before = await course.snapshot()
        code, err = await run_chatterd("--database-url", dsn, "--import-course")
        self.assertEqual(code, 0, err)
        self.assertIn("1 board post(s), 3 message(s) in 2 appID(s) as 2 turn(s), tool schemas of 0 appID(s);"
                      " skipped 0 row(s)", err)
        code, err = await run_chatterd("--database-url", dsn, "--import-course")
        self.assertEqual(code, 0, err)
        self.assertIn("0 board post(s), 0 message(s) in 0 appID(s)", err)

        proc, base = await self.start(dsn)
        try:
            self.assertEqual(await self.getchatts(base), board)
            history = await self.chat(base, tools, "last")
            self.assertEqual(await self.chat(base, "edu.umich.late", "again"),
                             [{"role": "user", "content": "hello"}, {"role": "user", "content": "again"}])
        finally:
            await stop(proc)
        # Appended as a new turn after chatterd's own turns.
        self.assertEqual(history[-3:], [{"role": "user", "content": "Back again."},
                                        {"role": "assistant", "content": "Welcome back."},
                                        {"role": "user", "content": "last"}])
        self.assertEqual(len(history), len(expected_tools) + 4 + 3)
        self.assertEqual(await course.snapshot(), before)

    @gen_test(timeout=300)
    async def test_long_imported_conversation_sends_its_newest_turns_within_the_budget(self):
        """100,000 imported messages and a 2048-token context: the model gets the system
        prompt, the newest whole turns of the course's history that fit, and the new message."""
        dsn = await fresh_database("course_long", NEWER)
        con = await self.connect(dsn)
        app_id = "edu.umich.long"
        # The course's rows, one second apart: the system prompt (/llmprep), a first request
        # with two user messages and its reply, then 49,998 requests of one user message each
        # with its reply: 100,000 messages.
        await con.execute(
            "INSERT INTO chatts (name, message, id, time, appid)"
            " SELECT CASE WHEN i = 0 THEN 'system' WHEN i IN (1, 2) OR (i >= 4 AND i % 2 = 0)"
            "             THEN 'user' ELSE 'assistant' END,"
            "        CASE WHEN i = 0 THEN 'You keep the ship''s log.'"
            "             WHEN i = 1 THEN 'day 0, first watch?' WHEN i = 2 THEN 'day 0, second watch?'"
            "             WHEN i = 3 THEN 'Day 0: calm seas.'"
            "             WHEN i % 2 = 0 THEN format('What happened on day %s?', (i - 2) / 2)"
            "             ELSE format('Day %s: wind from the west, all well.', (i - 2) / 2) END,"
            "        gen_random_uuid(), timestamp '2026-01-05 08:00' + i * interval '1 second', $1"
            "   FROM generate_series(0, 99999) AS i", app_id)
        course = [{"role": r["name"], "content": r["message"]} for r in await con.fetch(
            "SELECT name, message FROM chatts WHERE appid = $1 ORDER BY time", app_id)]
        self.assertEqual(len(course), 100_000)
        system, history = course[0], course[1:]
        context = 2048
        budget = context - context // 4  # the reply's reserve (no num_predict)

        proc, base = await self.start(dsn)
        try:
            new = {"role": "user", "content": "And today?"}
            before = len(self.double.chat_requests())
            body = await curl("-N", "-X", "POST", f"{base}/llmchat", "-d", jsonfmt.dumps(
                {"appID": app_id, "model": "llama3.2", "stream": True,
                 "options": {"num_ctx": context}, "messages": [new]}))
            self.assertIn(b"\ndata: ", body)  # (an error object otherwise, which says why)
            sent = (await self.double.wait_for_chats(before + 1))[before].messages
        finally:
            await stop(proc)
        [line] = import_lines(proc.log)
        self.assertIn("100000 message(s) in 1 appID(s)", line)

        self.assertEqual(sent[0], system)
        self.assertEqual(sent[-1], new)
        kept = sent[1:-1]
        self.assertTrue(kept, "none of the imported history was sent")
        self.assertEqual(kept, history[-len(kept):])  # the newest, contiguous, in order
        self.assertEqual(kept[0]["role"], "user")  # whole turns: from a user message on
        self.assertEqual(shape_problems(sent), [])
        # The budget is filled: the turn before the oldest one sent would not have fit.
        tokens = sum(map(estimate_tokens, sent))
        older = history[-len(kept) - 2:-len(kept)]
        self.assertEqual([m["role"] for m in older], ["user", "assistant"])
        self.assertLessEqual(tokens, budget)
        self.assertGreater(tokens + sum(map(estimate_tokens, older)), budget)
        self.assertIn(f": context sent={len(sent)} messages/{tokens} tokens;"
                      f" omitted={len(course) - len(sent) + 1} messages/".encode(), body)

    @gen_test(timeout=120)
    async def test_older_course_spelling_username(self):
        dsn = await fresh_database("course_old", OLDER)
        con = await self.connect(dsn)
        course = Course(con, role_column="username")
        await course.postchatt("ishmael", "Call me Ishmael.")
        app_id = "edu.umich." + "x" * 140  # VARCHAR(155) holds longer appIDs than the newer 64
        await course.llmprep(app_id, "You are a pirate.")
        await course.llmchat(app_id, [("user", "Hi, my name is Ishmael.")], reply="Ahoy, Ishmael.")
        await course.postchatt("queequeg", "second")
        board = await course.board()
        before = await course.snapshot()
        proc, base = await self.start(dsn)
        try:
            self.assertEqual(await self.getchatts(base), board)
            self.assertEqual(await self.chat(base, app_id, "What is my name?"), [
                {"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "Hi, my name is Ishmael."},
                {"role": "assistant", "content": "Ahoy, Ishmael."},
                {"role": "user", "content": "What is my name?"}])
        finally:
            await stop(proc)
        [line] = import_lines(proc.log)
        self.assertIn("2 board post(s), 3 message(s) in 1 appID(s)", line)
        self.assertEqual(await course.snapshot(), before)

    @gen_test(timeout=120)
    async def test_benchmark_layout_starts_cleanly(self):
        dsn = await fresh_database("course_bench", BENCH)
        con = await self.connect(dsn)
        before = await Course(con).snapshot()
        proc, base = await self.start(dsn)
        try:
            self.assertEqual(await self.chat(base, "bench", "hi"), [{"role": "user", "content": "hi"}])
            self.assertEqual(jsonfmt.loads(await curl(f"{base}/getchatts")), [])
        finally:
            await stop(proc)
        self.assertFalse(any("Traceback" in line for line in proc.log), "".join(proc.log))
        [line] = import_lines(proc.log)
        self.assertIn("0 board post(s), 0 message(s)", line)
        self.assertEqual(await Course(con).snapshot(), before)

    @gen_test(timeout=60)
    async def test_explicit_import_without_a_course_table_says_so(self):
        dsn = await fresh_database("course_none", [])
        code, err = await run_chatterd("--database-url", dsn, "--import-course")
        self.assertEqual(code, 1, err)
        self.assertEqual(err.strip().splitlines()[-1],
                         "chatterd: nothing to import: the database has no course table public.chatts"
                         " (name or username, message, id uuid, time)")


class StartupFailureTest(AsyncTestCase):
    """A database chatterd cannot use ends start-up with one line and exit code 1."""

    def assert_one_line_exit_1(self, code: int, err: str, prefix: str) -> None:
        self.assertEqual(code, 1, err)
        self.assertNotIn("Traceback", err)
        last = err.strip().splitlines()[-1]
        self.assertTrue(last.startswith(prefix), err)

    @gen_test(timeout=60)
    async def test_conflicting_object_in_the_schema(self):
        dsn = await fresh_database("conflict", ["CREATE SCHEMA chatterd",
                                                "CREATE TABLE chatterd.chatts (something int)"])
        code, err = await run_chatterd("--database-url", dsn, "--ollama-url", "http://127.0.0.1:9")
        self.assert_one_line_exit_1(
            code, err, "chatterd: cannot set up chatterd's schema in the database: DuplicateTableError:"
                       ' relation "chatts" already exists')

    @gen_test(timeout=60)
    async def test_unreachable_database(self):
        dsn = f"postgresql://chatterd@127.0.0.1:{unused_port()}/chatterd"
        code, err = await run_chatterd("--database-url", dsn, "--db-timeout", "3")
        self.assert_one_line_exit_1(code, err, "chatterd: the database is unreachable: ")


# What the course import of 84d1182 stored, repaired by migration 0015 -------------------

LONG_ROWS = 2_000  # the long conversation: a system prompt, then requests and their replies


def test_conversations_imported_as_one_turn_are_split_without_losing_or_reordering_a_message():
    """A database that 84d1182 set up and filled (its migrations, its course_import(), its
    turns): each appID's imported history was one turn.  The upgrade splits it at each user
    message that follows another role's, renumbers the appID's later turns after the parts,
    and moves no message out of its place; the budget then sends the newest whole turns."""
    async def go() -> None:
        dsn = await release_database(TEN_MIGRATIONS)
        con = await asyncpg.connect(dsn, server_settings={"search_path": "chatterd"})
        try:
            for statement in NEWER:
                await con.execute(statement.replace("TABLE chatts", "TABLE public.chatts"))
            course = Course(con)
            await con.execute("SET search_path = public")
            await con.execute(
                "INSERT INTO chatts (name, message, id, time, appid)"
                " SELECT CASE WHEN i = 0 THEN 'system' WHEN i % 2 = 1 THEN 'user' ELSE 'assistant' END,"
                "        format('long %s', i), gen_random_uuid(),"
                "        timestamp '2026-01-05 08:00' + i * interval '1 second', 'edu.long'"
                "   FROM generate_series(0, $1) AS i", LONG_ROWS)
            await course.llmprep("edu.tools", "You are terse.")
            await course.llmchat("edu.tools", [("user", "What's the weather?"), ("user", "Here.")])
            await course.tool_round("edu.tools", jsonfmt.dumps(TOOL_CALLS), '{"temperature": 21}')
            await course.llmchat("edu.tools", [], reply="It is 21 degrees.")
            await course.llmchat("edu.one", [("user", "only")], reply="once")
            await con.execute("SET search_path = chatterd")
            first = jsonfmt.loads(await con.fetchval("SELECT course_import('public.chatts')::text"))

            async def turn(app: str, text: str, reply: str, status: str = "complete") -> None:
                turn_id = await con.fetchval(
                    "SELECT turn_id FROM begin_turn($1, 'host:1:old', 10, $2::jsonb, false, 120,"
                    " 6144, 8192, NULL, NULL, NULL)", app, jsonfmt.dumps([{"role": "user", "content": text}]))
                await con.fetchval("SELECT end_turn($1, $2, NULL, $3, NULL, 'm', NULL, true, NULL)",
                                   turn_id, status, reply)

            await turn("edu.long", "after the move", "noted")
            await turn("edu.tools", "and tomorrow?", "", "failed")  # before any text: lone in 84d1182
            await con.execute("UPDATE turns SET delivered = true")  # its client saw the error
            await turn("edu.tools", "and tomorrow?", "Cooler.")
            await con.execute("SET search_path = public")
            await course.llmchat("edu.long", [("user", "late question")], reply="late answer")
            await con.execute("SET search_path = chatterd")
            second = jsonfmt.loads(await con.fetchval("SELECT course_import('public.chatts')::text"))
            await turn("edu.long", "after the second move", "noted again")

            order = ("SELECT appid, array_agg(seq ORDER BY turn_id, seq) AS seqs,"
                     " array_agg(row(seq, role, content, extra, status, created_at)::text ORDER BY seq)"
                     " AS rows FROM messages GROUP BY appid ORDER BY appid")
            before = [tuple(r) for r in await con.fetch(order)]
            turns_before = await con.fetchval("SELECT count(*) FROM turns")
            one_turn = await con.fetchrow(
                "SELECT count(*) AS turns, count(DISTINCT appid) AS appids, sum((SELECT count(*)"
                " FROM messages m WHERE m.turn_id = t.id)) AS messages"
                " FROM turns t WHERE owner LIKE 'course import %'")
            # 84d1182 stored one turn per appID and import.
            assert (first["appids"], second["appids"], one_turn["turns"]) == (3, 1, 4)

            applied = await upgrade(dsn)
            assert applied.versions == versions_after(10)
            assert [tuple(r) for r in await con.fetch(order)] == before  # nothing lost or moved
            imported = await con.fetch(
                "SELECT t.id, t.appid, t.owner, t.tokens, t.nmessages, s.tokens AS size_tokens,"
                " s.nmessages AS size_n, array_agg(m.role ORDER BY m.seq) AS roles"
                " FROM turns t JOIN messages m ON m.turn_id = t.id, turn_size(t.owner_id, t.id) s"
                " WHERE t.owner LIKE 'course import %' GROUP BY t.owner_id, t.id, s.tokens, s.nmessages"
                " ORDER BY t.id")
            made = len(imported) - one_turn["turns"]
            print(f"\nrepair: {one_turn['messages']} imported messages in {one_turn['appids']} appIDs,"
                  f" {one_turn['turns']} one-turn imports -> {len(imported)} turns ({made} made);"
                  f" {await con.fetchval('SELECT count(*) FROM turns') - turns_before} turns in all")
            # edu.long: a turn per request (the system prompt with the first) and the late
            # one; edu.tools and edu.one: one request each.
            assert len(imported) == LONG_ROWS // 2 + 1 + 1 + 1, len(imported)
            for t in imported:  # each starts with its user messages, and has no other
                roles = [r for r in t["roles"] if r != "system"]
                users = [i for i, r in enumerate(roles) if r == "user"]
                assert users and users == list(range(len(users))), t
                if (t["appid"], t["owner"]) == ("edu.long", "course import 1"):
                    # Split: each part has its size (the turns left whole are sized by
                    # begin_turn, as turns stored by other means).
                    assert (t["tokens"], t["nmessages"]) == (t["size_tokens"], t["size_n"]), t
            tools = [list(t["roles"]) for t in imported if t["appid"] == "edu.tools"]
            assert tools == [["system", "user", "user", "assistant", "tool", "assistant"]]
            assert await con.fetchval("SELECT count(*) FROM turns WHERE unanswered") == 1
        finally:
            await con.close()

        pool = await db_pool.create_pool(dsn, settings.defaults(db_pool_size=2))
        try:
            new = {"role": "user", "content": "now?"}
            turn_id, history, window, _ = await conversations.begin_turn(
                pool, ANONYMOUS, "edu.long", "new", 10, [new], budget=600, context=800)
            sent = history + [new]
            assert shape_problems(sent) == [], shape_problems(sent)
            assert sent[0]["content"] == "long 0" and sent[-5:] == [
                {"role": "user", "content": "late question"},
                {"role": "assistant", "content": "late answer"},
                {"role": "user", "content": "after the second move"},
                {"role": "assistant", "content": "noted again"}, new]
            assert 20 < window.sent_messages < LONG_ROWS // 2 and window.omitted_messages > 0
            await conversations.end_turn(pool, ANONYMOUS, turn_id, "complete", None, Reply(content="ok"))
            _, history, _, _ = await conversations.begin_turn(pool, ANONYMOUS, "edu.tools", "new", 10,
                                                              [new])
            # The turn that failed before any text is a record only: its message is sent once,
            # by the resend that was answered.
            contents = [m["content"] for m in history]
            assert contents.count("and tomorrow?") == 1 and contents[-2:] == ["and tomorrow?", "Cooler."]
            one_request = [("What's the weather?", "Here.")]  # (the course client's own break)
            assert shape_problems(history + [new], lambda a, b: a is not None and (
                a["content"], b["content"]) in one_request) == []
        finally:
            await pool.close()

    asyncio.run(go())

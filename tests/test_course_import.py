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
from tests.ollama_double import OllamaDouble, default_reply
from tests.support import fresh_database
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
        self.assertIn("3 board post(s), 11 message(s) in 2 appID(s), tool schemas of 1 appID(s);"
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
        self.assertIn("1 board post(s), 3 message(s) in 2 appID(s), tool schemas of 0 appID(s);"
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

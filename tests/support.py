"""Shared test machinery: one real PostgreSQL per test run, and a base test case that
serves chatterd and an Ollama double on the test's IOLoop."""

import atexit
import asyncio
from datetime import timedelta
import shutil
import tempfile
from typing import Any, Optional
import uuid

import asyncpg
from tornado.testing import AsyncHTTPTestCase

import jsonfmt
import settings
from chatterd import Application
from db import embedded, migrate, pool as db_pool
from db.conversations import ANONYMOUS
from upstreams import router
from upstreams.router import Router
from tests.ollama_double import OllamaDouble

_dsn: Optional[str] = None


def database_url() -> str:
    """DSN of a migrated test database on an embedded PostgreSQL, started once per run."""
    global _dsn
    if _dsn is None:
        root = tempfile.mkdtemp(prefix="chatterd-test-")
        atexit.register(shutil.rmtree, root, True)
        admin = embedded.start(root)
        _dsn = asyncio.run(embedded.ensure_database(admin, "chatterd_test"))

        async def prepare() -> None:
            pool = await db_pool.create_pool(_dsn, settings.defaults(db_pool_size=2))
            await migrate.migrate(pool)
            await pool.close()

        asyncio.run(prepare())
    return _dsn


async def fresh_database(prefix: str, ddl: list[str] = ()) -> str:
    """A new, empty database on the test run's PostgreSQL (then *ddl* run in it); its DSN."""
    admin = database_url().replace("/chatterd_test?", "/postgres?", 1)
    dsn = await embedded.ensure_database(admin, f"{prefix}_{uuid.uuid4().hex[:10]}")
    con = await asyncpg.connect(dsn)
    try:
        for statement in ddl:
            await con.execute(statement)
    finally:
        await con.close()
    return dsn


# How a turn can end and belong to the conversation (unless it ended before any answer
# text: `unanswered`, a record only).
ENDED = ("complete", "interrupted", "failed")

# A conversation as the model is sent it all (no context budget): every (owner_id, appid)
# that has turns, with the Ollama messages of its ended turns bar the unanswered ones,
# system prompts first, then turn by turn in order; a reply that ended with neither text
# nor tool calls left out.
CONVERSATIONS_AS_SENT = """
    SELECT a.owner_id, a.appid, coalesce((
        SELECT jsonb_agg(jsonb_build_object('role', m.role, 'content', m.content)
                         || coalesce(m.extra, '{}'::jsonb)
                         ORDER BY m.role <> 'system', m.turn_id, m.seq)
          FROM chatterd.messages m
          JOIN chatterd.turns t ON t.owner_id = m.owner_id AND t.id = m.turn_id
         WHERE m.owner_id = a.owner_id AND m.appid = a.appid
           AND t.owner_id = a.owner_id AND t.appid = a.appid
           AND t.status IN ('complete', 'interrupted', 'failed') AND NOT t.unanswered
           AND (m.status = 'complete' OR m.content <> '' OR m.extra ? 'tool_calls')),
        '[]'::jsonb)::text AS conversation
      FROM (SELECT DISTINCT owner_id, appid FROM chatterd.turns) a"""


async def read_conversation(pool: asyncpg.Pool, app_id: str,
                            owner_id: int = ANONYMOUS) -> list[asyncpg.Record]:
    """The stored conversation of the owner's appID, every row of its ended turns in order
    (replies with no text included; the records of turns that ended before any answer
    text left out: see read_turns)."""
    return await pool.fetch(
        "SELECT m.seq, m.turn_id, m.role, m.content, m.extra, m.status, m.error, m.model,"
        " m.tokens, m.ntokens, m.ntokens_from FROM chatterd.messages m"
        " JOIN chatterd.turns t ON t.owner_id = m.owner_id AND t.id = m.turn_id"
        " WHERE m.owner_id = $1 AND m.appid = $2 AND t.status = ANY($3::text[])"
        " AND NOT t.unanswered"
        " ORDER BY m.role <> 'system', m.turn_id, m.seq", owner_id, app_id, list(ENDED))


async def read_turns(pool: asyncpg.Pool, app_id: str,
                     owner_id: int = ANONYMOUS) -> list[asyncpg.Record]:
    """Every turn of the owner's appID, ended or not, in order (unanswered: ended before any
    answer text, a record outside the conversation)."""
    return await pool.fetch("SELECT id, status, owner, error, unanswered FROM chatterd.turns"
                            " WHERE owner_id = $1 AND appid = $2 ORDER BY id", owner_id, app_id)


class ChatterdTestCase(AsyncHTTPTestCase):
    """chatterd (real HTTP server, real PostgreSQL) in front of an Ollama double.

    `self.config` is chatterd's settings: the defaults, changed by the `settings_overrides`
    of this class and of every subclass (by Python name; a subclass's win over its bases'),
    with --upstreams from `upstream_specs()`.  `self.double` is the double, `self.pool`
    chatterd's pool.
    """

    settings_overrides: dict[str, Any] = {
        "idle_timeout": 30.0,
        "request_timeout": 60.0,
        "weather_url": "",  # no resident weather tool unless a test serves a fake Open-Meteo
        "db_pool_size": 20,
    }

    def dsn(self) -> str:
        return database_url()

    def upstream_specs(self) -> str:
        """--upstreams for this test: the Ollama double."""
        return self.double.url

    def make_config(self) -> settings.Settings:
        overrides: dict[str, Any] = {"upstreams": self.upstream_specs()}
        for cls in reversed(type(self).__mro__):
            overrides.update(vars(cls).get("settings_overrides", {}))
        return settings.defaults(**overrides)

    def get_app(self) -> Application:
        self.double = OllamaDouble()
        self.double.listen()
        self.config = self.make_config()
        dsn = self.dsn()
        self.pool = self.io_loop.run_sync(lambda: db_pool.create_pool(dsn, self.config))
        self.io_loop.run_sync(self.truncate)
        self.upstreams = self.io_loop.run_sync(self.make_upstreams)
        return Application(self.pool, self.upstreams, self.config)

    async def make_upstreams(self) -> Router:
        return router.from_settings(self.config)

    async def truncate(self) -> None:
        try:
            con = await asyncpg.connect(database_url())
        except OSError:
            return
        try:
            await con.execute("TRUNCATE chatterd.chatts, chatterd.messages, chatterd.turns,"
                              " chatterd.leases, chatterd.conversation_sizes, chatterd.tool_schemas,"
                              " chatterd.turn_streams, chatterd.turn_event_chunks")
        finally:
            await con.close()

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.double.stop)
        self.io_loop.run_sync(self._app.resume.close)
        self.io_loop.run_sync(lambda: asyncio.wait_for(self.pool.close(), 10))
        self.upstreams.close()
        self._app.turns.close()
        super().tearDown()

    # -- helpers -------------------------------------------------------------------

    def post_json(self, path: str, body: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        data = body if isinstance(body, (bytes, str)) else jsonfmt.dumps(body)
        return self.fetch(path, method="POST", body=data, raise_error=False, **kwargs)

    def rows(self, app_id: str) -> list:
        """The stored conversation (from a synchronous test)."""
        return self.io_loop.run_sync(lambda: self.conversation(app_id))

    async def conversation(self, app_id: str) -> list:
        """The stored conversation (from a gen_test): the rows of its ended turns."""
        return await read_conversation(self.pool, app_id)

    async def turns(self, app_id: str) -> list:
        """Every turn of the appID with its status, ended or not."""
        return await read_turns(self.pool, app_id)


def chat_body(app_id: str, content: str, model: str = "llama3.2", **extra: Any) -> dict:
    return {"appID": app_id, "model": model, "stream": True,
            "messages": [{"role": "user", "content": content}], **extra}


async def streams_finished(app, timeout=10.0):
    """Wait until chatterd has finished (and stored) every request in flight."""
    deadline = asyncio.get_running_loop().time() + timeout
    while app.in_flight:
        remaining = timedelta(seconds=deadline - asyncio.get_running_loop().time())
        assert await app.request_finished.wait(timeout=remaining), "requests did not finish"


async def chat_and_leave(port, body, wait_for=b"data: ", path=b"/llmchat"):
    """A raw-socket client: send the chat, read until *wait_for*, then drop the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = jsonfmt.dumpb(body)
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    seen = b""
    while wait_for not in seen:
        data = await asyncio.wait_for(reader.read(4096), 10)
        assert data, f"connection closed before {wait_for!r}: {seen!r}"
        seen += data
    writer.transport.abort()
    return seen

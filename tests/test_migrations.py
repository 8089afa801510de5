"""db/migrate.py: versioned migrations for the tables, one repeatable file per SQL function.

Databases made by earlier releases (their own migrate.py and migrations, kept in
tests/releases/, run as they ran them) upgrade to exactly what a new database gets, their data kept; a function file is applied
again when its text changes, and only then; processes that start together migrate once.
"""

import asyncio
import atexit
import hashlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import asyncpg
import pytest

import jsonfmt
import settings
from db import conversations, migrate, pool as db_pool
from db.conversations import ANONYMOUS, Reply
from tests.support import fresh_database

ROOT = Path(__file__).resolve().parent.parent

FIRST_RELEASE = "d6de548"  # the first commit with db/migrations: 0001 only, in `public`
TURNS_IN_PUBLIC = "a72cc4f"  # 0001 and 0002, turn functions in `public`
TEN_MIGRATIONS = "84d1182"  # 0001-0010 in the schema `chatterd`, functions defined in them

RELEASES = Path(__file__).resolve().parent / "releases"
_checkouts: dict[str, ModuleType] = {}


def versions_after(version: int) -> list[int]:
    """The versioned migrations a database at *version* has still to apply."""
    return [v for v, _, _ in migrate.available() if v > version]


def release_migrate(commit: str) -> ModuleType:
    """db/migrate.py as it was at *commit*, running that commit's db/migrations/.

    tests/releases/<commit>/ holds those files as they shipped (`git archive <commit>
    db/migrate.py db/migrations`), so the tests need no git history (CI may clone shallow).
    """
    if commit not in _checkouts:
        path = RELEASES / commit / "migrate.py"
        spec = importlib.util.spec_from_file_location(f"migrate_{commit}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _checkouts[commit] = module
    return _checkouts[commit]


async def release_database(commit: str) -> str:
    """A new database set up by the release at *commit*; its DSN.  Its pool has no
    search_path of its own, as that release's pool had none or set it while migrating."""
    dsn = await fresh_database(f"release_{commit}")
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=1)
    try:
        await release_migrate(commit).migrate(pool)
    finally:
        await pool.close()
    return dsn


async def upgrade(dsn: str) -> migrate.Migrated:
    pool = await db_pool.create_pool(dsn, settings.defaults(db_pool_size=1))
    try:
        return await migrate.migrate(pool)
    finally:
        await pool.close()


async def new_database() -> str:
    dsn = await fresh_database("fresh")
    await upgrade(dsn)
    return dsn


async def catalog(dsn: str) -> dict[str, Any]:
    """What a database's schema is made of, as comparable text: chatterd's and public's
    tables and their columns, constraints, indexes, sequences and functions, and the
    migrations and function files recorded as applied."""
    con = await asyncpg.connect(dsn)  # search_path: public, so every name is qualified
    try:
        ours = "IN (SELECT oid FROM pg_namespace WHERE nspname IN ('chatterd', 'public'))"

        async def recorded(table: str, columns: str) -> list[tuple]:
            if not await con.fetchval("SELECT to_regclass($1) IS NOT NULL", f"chatterd.{table}"):
                return []
            return [tuple(r) for r in await con.fetch(
                f"SELECT {columns} FROM chatterd.{table} ORDER BY 1")]

        return {
            "columns": [tuple(r) for r in await con.fetch(
                "SELECT c.oid::regclass::text, a.attname, format_type(a.atttypid, a.atttypmod),"
                " a.attnotnull, a.attidentity, pg_get_expr(d.adbin, d.adrelid)"
                " FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
                " LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum"
                f" WHERE c.relnamespace {ours} AND c.relkind IN ('r', 'p')"
                " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, a.attnum")],
            "constraints": sorted(tuple(r) for r in await con.fetch(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
                f" FROM pg_constraint WHERE connamespace {ours}")),
            "indexes": sorted(r[0] for r in await con.fetch(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i"
                f" JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace {ours}")),
            "sequences": sorted(tuple(r) for r in await con.fetch(
                "SELECT s.seqrelid::regclass::text, s.seqtypid::regtype::text,"
                " d.refobjid::regclass::text, a.attname FROM pg_sequence s"
                " JOIN pg_class c ON c.oid = s.seqrelid"
                " LEFT JOIN pg_depend d ON d.objid = s.seqrelid AND d.classid = 'pg_class'::regclass"
                "  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')"
                " LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
                f" WHERE c.relnamespace {ours}")),
            "functions": {r[0]: r[1] for r in await con.fetch(
                "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p"
                f" WHERE p.pronamespace {ours}")},
            "migrations": await recorded("schema_migrations", "version, name"),
            "function_files": await recorded("schema_functions", "name, sha256"),
        }
    finally:
        await con.close()


async def table_rows(con: asyncpg.Connection, schema: str,
                     columns: dict[str, list[str]] | None = None) -> dict[str, list[tuple]]:
    """Every row of every table of *schema* (bar the migrations' own), in a fixed order;
    with *columns* (table -> its columns, see table_columns), only those tables and columns."""
    tables = [r[0] for r in await con.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = $1::regnamespace AND relkind = 'r'"
        " AND relname NOT IN ('schema_migrations', 'schema_functions') ORDER BY 1", schema)]
    if columns is not None:
        tables = [t for t in tables if t in columns]
    return {t: sorted((tuple(map(str, r)) for r in await con.fetch(
                f"SELECT {', '.join(columns[t]) if columns else '*'} FROM {schema}.{t}")))
            for t in tables}


async def table_columns(con: asyncpg.Connection, schema: str) -> dict[str, list[str]]:
    """The columns of every table of *schema*, in order."""
    columns: dict[str, list[str]] = {}
    for r in await con.fetch(
            "SELECT c.relname, a.attname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
            " WHERE c.relnamespace = $1::regnamespace AND c.relkind = 'r' AND a.attnum > 0"
            " AND NOT a.attisdropped ORDER BY c.relname, a.attnum", schema):
        columns.setdefault(r["relname"], []).append(r["attname"])
    return columns


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- an upgrade keeps the data ---------------------------------------------------------------

USER = '[{"role": "user", "content": %s}]'


def test_a_database_of_the_ten_migrations_upgrades_with_its_data_kept():
    async def go():
        dsn = await release_database(TEN_MIGRATIONS)
        con = await asyncpg.connect(dsn, server_settings={"search_path": "chatterd"})
        try:
            # Its own functions, as that release called them: turns with replies, one
            # with tool rounds, a budgeted read, a resend window, a turn left running.
            await con.execute("INSERT INTO chatts (name, message) VALUES ('old', 'post')")
            await con.execute("INSERT INTO tool_schemas (appid, schemas) VALUES ('a', '[]')")
            for n in range(3):
                turn = await con.fetchval(
                    "SELECT turn_id FROM begin_turn('a', 'old', 10, $1::jsonb, false, 120, 8192,"
                    " 8192, NULL, NULL, NULL)", USER % json.dumps(f"q{n}"))
                assert await con.fetchval("SELECT end_turn($1, 'complete', NULL, $2, NULL, 'm', 5,"
                                          " true, $3)", turn, f"r{n}", 20 + 10 * n) == "stored"
            turn = await con.fetchval("SELECT turn_id FROM begin_turn('b', 'old', 10, $1::jsonb)",
                                      USER % '"weather?"')
            call = {"role": "assistant", "content": "", "extra": {"tool_calls": [
                {"function": {"name": "get_weather", "arguments": {}}}]}, "model": "m", "tokens": 3}
            result = {"role": "tool", "content": "21", "extra": None, "model": None, "tokens": None}
            assert await con.fetchval(
                "SELECT end_turn($1, 'complete', NULL, 'warm', NULL, 'm', 2, true, 40, $2::jsonb,"
                " '[]'::jsonb)", turn, jsonfmt.dumps([call, result])) == "stored"
            running = await con.fetchval("SELECT turn_id FROM begin_turn('c', 'old', 600, $1::jsonb)",
                                         USER % '"still running"')
            before = await table_rows(con, "chatterd")
            columns = await table_columns(con, "chatterd")
            applied = await upgrade(dsn)
            assert applied.versions == versions_after(10)
            assert applied.functions == [name for name, _ in migrate.function_files()]
            assert await table_rows(con, "chatterd", columns) == before
            # None of these turns ended before any answer text (0016).
            assert await con.fetchval("SELECT count(*) FROM turns WHERE unanswered") == 0
            # Every conversation stayed where it was: the anonymous namespace (0021).
            for table in ("turns", "messages", "leases", "tool_schemas", "conversation_sizes"):
                assert await con.fetchval(f"SELECT count(*) FILTER (WHERE owner_id <> 0)"
                                          f" FROM {table}") == 0, table
            assert await con.fetchval("SELECT to_regprocedure('chatterd.conversation_of(text)')") is None
        finally:
            await con.close()

        pool = await db_pool.create_pool(dsn, settings.defaults(db_pool_size=2))
        try:
            # The new code goes on with those conversations.
            turn, history, window, _ = await conversations.begin_turn(
                pool, ANONYMOUS, "a", "new", 10, [{"role": "user", "content": "q3"}], budget=8192)
            assert [m["content"] for m in history] == ["q0", "r0", "q1", "r1", "q2", "r2"]
            assert window.omitted_messages == 0
            assert await conversations.end_turn(pool, ANONYMOUS, turn, "complete", None,
                                                Reply(content="r3", prompt_tokens=60)) == "stored"
            _, history, _, _ = await conversations.begin_turn(
                pool, ANONYMOUS, "b", "new", 10, [{"role": "user", "content": "and now?"}])
            assert [m["content"] for m in history] == ["weather?", "", "21", "warm"]
            busy, _, _, waiting = await conversations.begin_turn(
                pool, ANONYMOUS, "c", "new", 10, [{"role": "user", "content": "again"}])
            assert busy is None and waiting == {"waiting_for": running}
        finally:
            await pool.close()

    run(go())


def test_a_database_of_the_first_release_upgrades_with_its_data_kept():
    async def go():
        dsn = await release_database(FIRST_RELEASE)
        con = await asyncpg.connect(dsn)  # the first release kept everything in public
        try:
            await con.execute("INSERT INTO chatts (name, message) VALUES ('ishmael', 'Call me'),"
                              " ('ahab', 'whale')")
            old = [("a", "system", "Be brief.", None, "complete", None),
                   ("a", "user", "hi ✓", None, "complete", None),
                   ("a", "assistant", "hello", None, "complete", 7),
                   ("a", "user", "look", {"images": ["aGk="]}, "complete", None),
                   ("a", "assistant", "", None, "interrupted", None),  # never sent again
                   ("a", "user", "weather?", None, "complete", None),
                   ("a", "assistant", "", {"tool_calls": [{"function": {"name": "w"}}]},
                    "complete", None),
                   ("b", "user", "other", None, "complete", None),
                   ("b", "assistant", "half", None, "failed", None)]
            for app, role, content, extra, status, tokens in old:
                await con.execute("INSERT INTO messages (appid, role, content, extra, status, tokens)"
                                  " VALUES ($1, $2, $3, $4::jsonb, $5, $6)", app, role, content,
                                  None if extra is None else jsonfmt.dumps(extra), status, tokens)
            chatts = await con.fetch("SELECT seq, id, name, message, time FROM public.chatts ORDER BY seq")
            messages = await con.fetch("SELECT * FROM public.messages ORDER BY seq")

            applied = await upgrade(dsn)
            assert applied.versions == versions_after(1)
            assert await con.fetchval("SELECT to_regclass('public.messages')") is None
            assert await con.fetch("SELECT seq, id, name, message, time FROM chatterd.chatts"
                                   " ORDER BY seq") == chatts
            columns = list(messages[0].keys())
            moved = await con.fetch(f"SELECT {', '.join(columns)} FROM chatterd.messages ORDER BY seq")
            assert moved == messages
            # Each appID's messages became ended turns, split at each user message that follows
            # another role's (0015), their counts as the functions count.
            await con.execute("SET search_path = chatterd")  # (turn_size has no SET clause)
            turns = await con.fetch("SELECT t.appid, t.status, t.tokens, t.nmessages,"
                                    " s.tokens AS size_tokens, s.nmessages AS size_n"
                                    " FROM chatterd.turns t, chatterd.turn_size(t.owner_id, t.id) s"
                                    " ORDER BY t.appid, t.id")
            assert [(t["appid"], t["status"]) for t in turns] == [("a", "complete")] * 3 + [("b", "complete")]
            assert all((t["tokens"], t["nmessages"]) == (t["size_tokens"], t["size_n"]) for t in turns)
            # a: hi, hello | look (its empty reply is not sent) | weather?, the call; b: both
            assert [t["nmessages"] for t in turns] == [2, 1, 2, 2]
            counts = await con.fetch(
                "SELECT ntokens, ntokens_from, CASE WHEN role = 'assistant' AND tokens IS NOT NULL"
                " THEN tokens ELSE chatterd.estimate_tokens(content, extra) END AS expected"
                " FROM chatterd.messages ORDER BY seq")
            assert [c["ntokens"] for c in counts] == [c["expected"] for c in counts]
            assert [c["ntokens_from"] for c in counts].count("ollama") == 1
            assert 768 + 4 + 1 in [c["ntokens"] for c in counts]  # the image
            sizes = await con.fetch("SELECT s.appid, s.messages, s.tokens, count(*) AS n,"
                                    " sum(m.ntokens) AS t FROM chatterd.conversation_sizes s"
                                    " JOIN chatterd.messages m ON m.appid = s.appid"
                                    " AND chatterd.is_sent(m.status, m.content, m.extra)"
                                    " GROUP BY 1, 2, 3 ORDER BY 1")
            assert [(s["appid"], s["messages"], s["tokens"]) for s in sizes] == \
                [(s["appid"], s["n"], s["t"]) for s in sizes]
            assert [s["messages"] for s in sizes] == [6, 2]
        finally:
            await con.close()

        pool = await db_pool.create_pool(dsn, settings.defaults(db_pool_size=2))
        try:
            turn, history, window, _ = await conversations.begin_turn(
                pool, ANONYMOUS, "a", "new", 10, [{"role": "user", "content": "more"}],
                budget=100000)
            assert [(m["role"], m["content"]) for m in history] == [
                ("system", "Be brief."), ("user", "hi ✓"), ("assistant", "hello"), ("user", "look"),
                ("user", "weather?"), ("assistant", "")]
            assert history[3]["images"] == ["aGk="] and "tool_calls" in history[5]
            assert window.omitted_messages == 0
        finally:
            await pool.close()

    run(go())


def test_a_database_with_turn_functions_in_public_moves_into_the_schema():
    async def go():
        dsn = await release_database(TURNS_IN_PUBLIC)
        con = await asyncpg.connect(dsn)  # search_path: public, where that release worked
        try:
            await con.execute("INSERT INTO chatts (name, message) VALUES ('old', 'post')")
            turn = await con.fetchval("SELECT turn_id FROM begin_turn('a', 'o', 10, $1::jsonb)",
                                      USER % '"hi"')
            await con.execute("SELECT end_turn($1, 'complete', NULL, 'hello', NULL, NULL, NULL, true)",
                              turn)
            applied = await upgrade(dsn)
            assert applied.versions == versions_after(2)
            assert (await upgrade(dsn)) == migrate.Migrated()
            assert await con.fetchval("SELECT to_regclass('public.chatts')") is None
            assert await con.fetchval("SELECT count(*) FROM pg_proc"
                                      " WHERE pronamespace = 'public'::regnamespace") == 0
            assert await con.fetchval("SELECT name || ' ' || message FROM chatterd.chatts") == "old post"
            # The functions find their tables whatever the caller's search_path (here: public).
            row = await con.fetchrow("SELECT turn_id, history FROM chatterd.begin_turn(0, 'a', 'n',"
                                     " 10, $1::jsonb)", USER % '"again"')
            assert jsonfmt.loads(row["history"]) == [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]
            assert row["turn_id"] > turn  # the turn sequence moved with its table
            await con.execute("INSERT INTO chatterd.chatts (name, message) VALUES ('new', 'post')")
            assert await con.fetchval("SELECT max(seq) FROM chatterd.chatts") == 2
        finally:
            await con.close()

    run(go())


# -- an upgraded database is a new one -------------------------------------------------------

@pytest.mark.parametrize("commit", [TEN_MIGRATIONS, FIRST_RELEASE, TURNS_IN_PUBLIC])
def test_an_upgraded_database_has_the_schema_and_functions_of_a_new_one(commit):
    async def go():
        old = await release_database(commit)
        before = await catalog(old)
        await upgrade(old)
        return before, await catalog(old), await catalog(await new_database())

    before, upgraded, new = run(go())
    assert before != new  # (the comparison sees what the upgrade changes)
    for part in new:
        assert upgraded[part] == new[part], part


def test_a_new_database_has_one_file_per_function_and_no_function_in_a_migration():
    async def go():
        return await catalog(await new_database())

    functions = run(go())["functions"]
    files = dict(migrate.function_files())
    assert sorted({re.match(r"chatterd\.(\w+)\(", sig).group(1) for sig in functions}) == sorted(files)
    for name, sql in files.items():
        defined = re.findall(r"CREATE OR REPLACE FUNCTION (\w+)\(", sql)
        assert defined and set(defined) == {name}, name
    for version, name, sql in migrate.available():
        assert not re.search(r"CREATE (OR REPLACE )?FUNCTION", sql, re.I), f"{version:04d}_{name}"


# -- function files are repeatable migrations ------------------------------------------------

async def function_rows(con: asyncpg.Connection) -> dict[str, int]:
    """Each function's pg_proc row version (xmin): CREATE OR REPLACE writes a new one."""
    return {r["sig"]: r["xmin"] for r in await con.fetch(
        "SELECT oid::regprocedure::text AS sig, xmin::text::bigint AS xmin FROM pg_proc"
        " WHERE pronamespace = 'chatterd'::regnamespace")}


def changed_functions_dir(changes: dict[str, tuple[str, str]]) -> Path:
    """A copy of db/functions/ with each file's text changed: name -> (old, new)."""
    copy = Path(tempfile.mkdtemp(prefix="chatterd-functions-"))
    atexit.register(shutil.rmtree, copy, True)
    for path in migrate.FUNCTIONS_DIR.glob("*.sql"):
        text = path.read_text()
        if path.stem in changes:
            old, new = changes[path.stem]
            assert old in text
            text = text.replace(old, new, 1)
        (copy / path.name).write_text(text)
    return copy


def test_a_changed_function_file_is_applied_again_and_an_unchanged_one_is_not():
    async def go():
        dsn = await new_database()
        con = await asyncpg.connect(dsn, server_settings={"search_path": "chatterd"})
        try:
            before = await function_rows(con)
            assert await con.fetchval("SELECT estimate_tokens('', NULL)") == 4
            assert (await upgrade(dsn)) == migrate.Migrated()
            assert await function_rows(con) == before

            changed = changed_functions_dir({"estimate_tokens": ("SELECT 4 +", "SELECT 5 +")})
            with mock.patch.object(migrate, "FUNCTIONS_DIR", changed):
                assert (await upgrade(dsn)).functions == ["estimate_tokens"]
                after = await function_rows(con)
                assert await con.fetchval("SELECT estimate_tokens('', NULL)") == 5
                sha = hashlib.sha256((changed / "estimate_tokens.sql").read_bytes()).hexdigest()
                assert await con.fetchval("SELECT sha256 FROM schema_functions"
                                          " WHERE name = 'estimate_tokens'") == sha
                assert (await upgrade(dsn)) == migrate.Migrated()
            assert [sig for sig in before if before[sig] != after[sig]] == \
                ["estimate_tokens(text,jsonb)"]
            # Back to the repository's text: applied again.
            assert (await upgrade(dsn)).functions == ["estimate_tokens"]
            assert await con.fetchval("SELECT estimate_tokens('', NULL)") == 4
        finally:
            await con.close()

    run(go())


def test_a_function_dropped_behind_its_file_is_made_again():
    async def go():
        dsn = await new_database()
        con = await asyncpg.connect(dsn, server_settings={"search_path": "chatterd"})
        try:
            await con.execute("DROP FUNCTION is_sent(text, text, jsonb)")
            assert (await upgrade(dsn)).functions == ["is_sent"]
            assert await con.fetchval("SELECT is_sent('failed', 'x', NULL)") is True
        finally:
            await con.close()

    run(go())


def test_a_function_file_whose_body_does_not_check_is_refused_and_nothing_is_applied():
    async def go():
        dsn = await new_database()
        con = await asyncpg.connect(dsn, server_settings={"search_path": "chatterd"})
        try:
            before = await function_rows(con)
            broken = changed_functions_dir({
                "estimate_tokens": ("SELECT 4 +", "SELECT 5 +"),
                "turn_size": ("FROM messages WHERE", "FROM no_such_table WHERE")})
            with mock.patch.object(migrate, "FUNCTIONS_DIR", broken):
                with pytest.raises(asyncpg.UndefinedTableError):
                    await upgrade(dsn)
            assert await function_rows(con) == before
            assert await con.fetchval("SELECT estimate_tokens('', NULL)") == 4
        finally:
            await con.close()

    run(go())


def test_a_database_migrated_by_a_newer_chatterd_keeps_its_functions():
    async def go():
        dsn = await new_database()
        con = await asyncpg.connect(dsn, server_settings={"search_path": "chatterd"})
        try:
            await con.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'later')")
            changed = changed_functions_dir({"estimate_tokens": ("SELECT 4 +", "SELECT 5 +")})
            with mock.patch.object(migrate, "FUNCTIONS_DIR", changed):
                assert (await upgrade(dsn)) == migrate.Migrated()
            assert await con.fetchval("SELECT estimate_tokens('', NULL)") == 4
            await con.execute("DELETE FROM schema_migrations WHERE version = 9999")
            with mock.patch.object(migrate, "FUNCTIONS_DIR", changed):
                assert (await upgrade(dsn)).functions == ["estimate_tokens"]
        finally:
            await con.close()

    run(go())


# -- processes starting together -------------------------------------------------------------

MIGRATE_ONCE = """
import asyncio, json, sys
import settings
from db import migrate, pool

async def main():
    p = await pool.create_pool(sys.argv[1], settings.defaults(db_pool_size=1, db_timeout=60))
    try:
        done = await migrate.migrate(p)
    finally:
        await p.close()
    print(json.dumps({"versions": done.versions, "functions": done.functions}))

asyncio.run(main())
"""


def test_two_processes_migrating_at_once_do_it_once():
    async def go():
        dsn = await fresh_database("together")
        holder = await asyncpg.connect(dsn)
        try:
            # Both processes reach the lock while it is held, so they contend for it.
            hold = holder.transaction()
            await hold.start()
            await holder.execute("SELECT pg_advisory_xact_lock($1)", migrate.LOCK_KEY)
            procs = [await asyncio.create_subprocess_exec(
                sys.executable, "-c", MIGRATE_ONCE, dsn, cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for _ in range(2)]
            deadline = asyncio.get_running_loop().time() + 30
            while await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND objid = $1 AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())", migrate.LOCK_KEY) < 2:
                assert asyncio.get_running_loop().time() < deadline, "the processes never waited"
                await asyncio.sleep(0.05)
            await hold.commit()
            outputs = [await p.communicate() for p in procs]
            for p, (out, err) in zip(procs, outputs):
                assert p.returncode == 0, err.decode()
            results = sorted((json.loads(out) for out, _ in outputs), key=lambda r: len(r["versions"]))
            assert results[0] == {"versions": [], "functions": []}
            assert results[1] == {"versions": [v for v, _, _ in migrate.available()],
                                  "functions": [name for name, _ in migrate.function_files()]}
        finally:
            await holder.close()
        new = await catalog(await new_database())
        assert await catalog(dsn) == new

    run(go())

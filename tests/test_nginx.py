"""The production deployment, end to end: the repository's own nginx.conf in a real nginx
(TLS, HTTP/1.1 and HTTP/2), in front of two real chatterd processes sharing one
PostgreSQL, an Ollama double on the test's IOLoop, and real curl as the client.

nginx.conf is an include file for nginx's http context.  The test renders it with a
few documented substitutions (see substitutions() and the header of nginx.conf) and wraps
it in a minimal top-level nginx.conf that, like Debian's, turns gzip on around it.

Every test builds its own stack (double, two chatterd, nginx) and tears it down, so
the tests are independent of each other and of their order.  Nothing here sleeps to
wait: it waits for log lines, curl's output and the double's events.
"""

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from tornado.testing import AsyncTestCase, bind_unused_port, gen_test

import jsonfmt
from tests.ollama_double import OllamaDouble, default_reply, split_tokens
from tests.sse_parser import parse
from tests.support import database_url

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "nginx.conf"
TOOLS_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
# A second loopback address for curl's side of a connection, so "the client's IP" (as
# nginx sees it) differs from nginx's own address towards chatterd (127.0.0.1).
OTHER_CLIENT = "127.0.0.2"
LONG = 30  # seconds: the generous bound on anything a test waits for


def tool(name: str) -> str:
    path = shutil.which(name, path=TOOLS_PATH)
    if path is None:
        raise AssertionError(f"{name} is not installed: the nginx tests need nginx, curl and openssl; "
                             f"run scripts/install-test-deps (as root on Debian), which installs them")
    return path


def unused_port() -> int:
    sock, port = bind_unused_port()
    sock.close()
    return port


# -- rendering nginx.conf for the test ---------------------------------------------------

def substitutions(*, https_port: int, http_port: int, cert: str, key: str, upstreams: list[int],
                  access_log: str, read_timeout: Optional[str] = None) -> dict[str, str]:
    """Directive in nginx.conf (whitespace-normalized) -> what the test puts instead.

    These are the only differences between the installed file and the tested one.
    """
    subs = {
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "ssl_certificate /etc/ssl/chatterd/chatterd.crt;": f"ssl_certificate {cert};",
        "ssl_certificate_key /etc/ssl/chatterd/chatterd.key;": f"ssl_certificate_key {key};",
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstreams[0]};",
        "server 127.0.0.1:8001;": f"server 127.0.0.1:{upstreams[1]};",
        "access_log /var/log/nginx/chatterd.access.log chatterd;": f"access_log {access_log} chatterd;",
    }
    if read_timeout is not None:
        subs["proxy_read_timeout 1h;"] = f"proxy_read_timeout {read_timeout};"
    return subs


def render(text: str, subs: dict[str, str]) -> str:
    """Replace each directive, which must be alone on exactly one (uncommented) line."""
    seen = {directive: 0 for directive in subs}
    out = []
    for line in text.splitlines(keepends=True):
        code, hash_, comment = line.partition("#")
        directive = " ".join(code.split())
        if directive in subs:
            seen[directive] += 1
            indent = code[:len(code) - len(code.lstrip())]
            line = f"{indent}{subs[directive]}{'  ' + hash_ + comment if hash_ else chr(10)}"
        out.append(line)
    wrong = {d: n for d, n in seen.items() if n != 1}
    assert not wrong, (f"nginx.conf no longer has each of these directives on exactly one line "
                       f"(found {wrong}); keep them so, or update tests/test_nginx.py")
    return "".join(out)


# The top level around the include file: nginx's own settings for a throwaway instance,
# and, in http, what Debian's /etc/nginx/nginx.conf sets around its includes.  Two
# additions make the file's own SSE settings the thing tested:
#  - gzip also for streams (Debian leaves gzip_types commented out): the file's
#    `gzip off` must keep them uncompressed whatever the main file says;
#  - proxy_ignore_headers X-Accel-Buffering: chatterd's own "do not buffer me" hint is
#    ignored, so only the file's `proxy_buffering off` can keep streams unbuffered.
MAIN_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;
events {{
    worker_connections 512;
}}
http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    default_type application/octet-stream;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    access_log {dir}/access.log;
    gzip on;
    gzip_types text/event-stream application/x-ndjson application/json;
    proxy_ignore_headers X-Accel-Buffering;

    include {dir}/chatterd.conf;
}}
"""


# -- processes ---------------------------------------------------------------------------

class Logged:
    """A subprocess whose stderr is collected line by line, so tests can wait for lines."""

    port = 0  # chatterd's

    def __init__(self, name: str, proc: asyncio.subprocess.Process, changed: asyncio.Condition) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self.eof = False
        self._changed = changed  # shared by the stack's processes: one wait covers several
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            line = await self.proc.stderr.readline()
            async with self._changed:
                if line:
                    self.lines.append(line.decode(errors="replace").rstrip("\n"))
                else:
                    self.eof = True
                self._changed.notify_all()
            if not line:
                return

    def log(self) -> str:
        return f"--- {self.name} (pid {self.proc.pid}) ---\n" + "\n".join(self.lines)

    async def stop(self, sig: int = signal.SIGTERM) -> Optional[int]:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
                await asyncio.wait_for(self.proc.wait(), LONG)
            except (ProcessLookupError, asyncio.TimeoutError):
                if self.proc.returncode is None:
                    self.proc.kill()
                    await self.proc.wait()
        try:
            await asyncio.wait_for(self._reader, 5)
        except asyncio.TimeoutError:
            self._reader.cancel()
        return self.proc.returncode


async def wait_line(procs: list[Logged], match: Callable[[str], bool], what: str,
                    timeout: float = LONG) -> tuple[Logged, str]:
    """The first line of any of *procs* for which *match* is true, waiting for it."""

    def found():
        for p in procs:
            for line in p.lines:
                if match(line):
                    return p, line
        if all(p.eof for p in procs):
            raise AssertionError(f"waiting for {what}, but the processes exited:\n"
                                 + "\n".join(p.log() for p in procs))
        return None

    changed = procs[0]._changed
    try:
        async with changed:
            return await asyncio.wait_for(changed.wait_for(found), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s:\n"
                             + "\n".join(p.log() for p in procs)) from None


ACCESS = re.compile(r"chatterd\.access: (\d{3}) (\S+) (\S+) (\S+) ")


def access(line: str) -> Optional[tuple[int, str, str, str]]:
    """(status, client ip, method, path) of a chatterd access-log line, else None."""
    m = ACCESS.search(line)
    return (int(m.group(1)), m.group(2), m.group(3), m.group(4)) if m else None


class Stream:
    """One curl run whose output is read as it arrives."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.received = b""

    async def line(self) -> bytes:
        line = await asyncio.wait_for(self.proc.stdout.readline(), LONG)
        assert line, f"curl ended early after {self.received[:300]!r}"
        self.received += line
        return line

    async def first_event(self) -> float:
        """Read up to the first `data:` line; return when it arrived (time.monotonic)."""
        while not (await self.line()).startswith(b"data: "):
            pass
        return time.monotonic()

    async def finish(self) -> tuple[bytes, str]:
        """(the whole body, curl's -w report) once curl is done."""
        rest, err = await asyncio.wait_for(self.proc.communicate(), LONG)
        self.received += rest
        assert self.proc.returncode == 0, f"curl exited {self.proc.returncode}: {err.decode()}"
        return self.received, err.decode()


class Stack:
    """An Ollama double, two chatterd processes and nginx from the repo's nginx.conf."""

    def __init__(self, cert: str, key: str, *, read_timeout: Optional[str] = None,
                 chatterd_args: tuple = ()) -> None:
        self.cert, self.key = cert, key
        self.read_timeout = read_timeout
        self.chatterd_args = chatterd_args
        self.procs: list[Logged] = []
        self.curls: list[asyncio.subprocess.Process] = []
        self.double: Optional[OllamaDouble] = None
        self.nginx: Optional[Logged] = None
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> "Stack":
        self.dir = tempfile.mkdtemp(prefix="chatterd-nginx-")
        os.chmod(self.dir, 0o755)  # nginx's workers (nobody, when run as root) use temp dirs here
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _start(self) -> None:
        self.double = OllamaDouble()
        self.double.listen()
        self.a, self.b = await asyncio.gather(self._chatterd("chatterd-a"), self._chatterd("chatterd-b"))
        self.https_port, self.http_port = unused_port(), unused_port()
        self.base = f"https://127.0.0.1:{self.https_port}"
        self.access_log = os.path.join(self.dir, "chatterd.access.log")
        subs = substitutions(https_port=self.https_port, http_port=self.http_port, cert=self.cert,
                             key=self.key, upstreams=[self.a.port, self.b.port],
                             access_log=self.access_log, read_timeout=self.read_timeout)
        Path(self.dir, "chatterd.conf").write_text(render(NGINX_CONF.read_text(), subs))
        main = Path(self.dir, "nginx.conf")
        main.write_text(MAIN_CONF.format(dir=self.dir))
        nginx = tool("nginx")
        args = ("-p", self.dir, "-e", "stderr", "-c", str(main))
        check = await asyncio.create_subprocess_exec(nginx, *args, "-t", stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(check.communicate(), LONG)
        assert check.returncode == 0 and b"test is successful" in out, \
            "nginx -t rejects the rendered nginx.conf:\n" + out.decode()
        proc = await asyncio.create_subprocess_exec(nginx, *args, "-g", "daemon off;",
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        self.nginx = Logged("nginx", proc, self._changed)
        # With error_log at notice, the master logs this once its sockets are listening.
        await wait_line([self.nginx], lambda line: "start worker process" in line, "nginx start-up")

    async def _chatterd(self, name: str) -> Logged:
        port = unused_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATTERD_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "chatterd.py", f"--port={port}", "--address=127.0.0.1", "--xheaders=true",
            f"--database-url={database_url()}", f"--ollama-url={self.double.url}", *self.chatterd_args,
            cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        p = Logged(name, proc, self._changed)
        p.port = port
        self.procs.append(p)
        await wait_line([p], lambda line: "chatterd listening" in line, f"{name} start-up", 60)
        return p

    async def close(self) -> None:
        for c in self.curls:
            if c.returncode is None:
                c.kill()
                await c.wait()
        if self.nginx is not None:
            await self.nginx.stop()
        for p in self.procs:
            await p.stop()
        if self.double is not None:
            await self.double.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(p.log() for p in [*self.procs, *([self.nginx] if self.nginx else [])])

    # -- clients ---------------------------------------------------------------------------

    def _curl_args(self, path: str, args: tuple, base: Optional[str]) -> list[str]:
        return [tool("curl"), "-sS", "--max-time", str(LONG), "--cacert", self.cert, *args,
                (base or self.base) + path]

    async def curl(self, path: str, *args: str, base: Optional[str] = None) -> tuple[int, bytes, str]:
        """(status, body, HTTP version) of one request, through nginx unless *base* says otherwise."""
        proc = await asyncio.create_subprocess_exec(
            *self._curl_args(path, ("-w", "%{stderr}%{http_code} %{http_version}", *args), base),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.curls.append(proc)
        out, err = await asyncio.wait_for(proc.communicate(), LONG + 5)
        assert proc.returncode == 0, f"curl {path} {args} exited {proc.returncode}: {err.decode()}"
        status, version = err.decode().split()[-2:]
        return int(status), out, version

    async def chat(self, app_id: str, content: str, model: str = "llama3.2", *args: str) -> list:
        """One complete /llmchat turn through nginx; its events."""
        status, body, _ = await self.curl("/llmchat", "-N", "-X", "POST",
                                          "-H", "Content-Type: application/json",
                                          "--data-binary", jsonfmt.dumps(chat(app_id, content, model)), *args)
        assert status == 200, f"/llmchat answered {status}: {body!r}\n{self.logs()}"
        events, _ = parse(body)
        assert jsonfmt.loads(events[-1].data).get("done"), body
        return events

    async def stream(self, app_id: str, content: str, model: str, *args: str) -> Stream:
        """Start a /llmchat turn through nginx whose events are read as they come."""
        proc = await asyncio.create_subprocess_exec(
            *self._curl_args("/llmchat", ("-N", "-X", "POST", "-H", "Content-Type: application/json",
                                          "-w", "%{stderr}%{http_code} %{http_version}",
                                          "--data-binary", jsonfmt.dumps(chat(app_id, content, model)),
                                          *args), None),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.curls.append(proc)
        return Stream(proc)

    def upstream_request(self, content: str):
        """The double's record of the chat request whose last message is *content*."""
        found = [r for r in self.double.chat_requests()
                 if r.body and r.body.get("messages") and r.body["messages"][-1].get("content") == content]
        assert len(found) == 1, f"{len(found)} upstream requests for {content!r}"
        return found[0]

    async def access_line(self, app_id: str, outcome: Optional[str] = None) -> tuple[Logged, str]:
        """The chatterd access line of appID's turn (and which process wrote it)."""
        def match(line: str) -> bool:
            return (access(line) is not None and f"appID='{app_id}'" in line
                    and (outcome is None or f"outcome='{outcome}'" in line))
        return await wait_line(self.procs, match, f"access line of appID {app_id!r} ({outcome})")


async def within(awaitable, timeout: float, what: str):
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"waited {timeout}s for {what}") from None


def chat(app_id: str, content: str, model: str) -> dict:
    return {"appID": app_id, "model": model, "stream": True,
            "messages": [{"role": "user", "content": content}]}


def new_id(label: str) -> str:
    return f"nginx-{label}-{uuid.uuid4().hex[:10]}"


def reply_text(events: list) -> str:
    return "".join(jsonfmt.loads(e.data).get("message", {}).get("content", "")
                   for e in events if e.event == "message")


async def stored(app_id: str) -> list[tuple[str, str, str]]:
    """(role, status, content) of appID's stored messages, in order."""
    con = await asyncpg.connect(database_url())
    try:
        rows = await con.fetch("SELECT role, status, content FROM chatterd.messages WHERE appid = $1 ORDER BY seq",
                               app_id)
    finally:
        await con.close()
    return [(r["role"], r["status"], r["content"]) for r in rows]


def metric_values(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


class NginxTest(AsyncTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        for name in ("nginx", "curl", "openssl"):
            tool(name)
        cls.cert_dir = tempfile.mkdtemp(prefix="chatterd-cert-")
        cls.cert = os.path.join(cls.cert_dir, "chatterd.crt")
        cls.key = os.path.join(cls.cert_dir, "chatterd.key")
        # docs/deployment.md's command for a self-signed certificate, valid for localhost and 127.0.0.1.
        made = subprocess.run(
            [tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "2",
             "-keyout", cls.key, "-out", cls.cert], capture_output=True, timeout=60)
        assert made.returncode == 0, made.stderr.decode()
        os.chmod(cls.cert_dir, 0o755)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.cert_dir, ignore_errors=True)
        super().tearDownClass()

    def stack(self, **kwargs) -> Stack:
        return Stack(self.cert, self.key, **kwargs)

    @gen_test(timeout=90)
    async def test_http1_and_http2_stream_unbuffered_and_uncompressed(self):
        async with self.stack() as s:
            s.double.behave("slow", token_delay=0.3)
            tokens = len(split_tokens(default_reply([{"role": "user", "content": "x"}])))
            self.assertGreaterEqual(tokens, 15)  # so the whole reply takes 4.5 s or more
            for flag, version in (("--http1.1", "1.1"), ("--http2", "2")):
                app_id = new_id("stream")
                content = f"stream over {flag}"
                headers = os.path.join(s.dir, f"headers{flag}")
                # Accept-Encoding without --compressed: a gzipped stream would not parse.
                stream = await s.stream(app_id, content, "slow", flag, "-H", "Accept-Encoding: gzip",
                                        "-D", headers)
                first = await stream.first_event()
                upstream = s.upstream_request(content)
                self.assertIsNone(upstream.finished_at, "the first event waited for the whole reply")
                self.assertLess(upstream.chunks_sent, tokens // 2)
                body, report = await stream.finish()
                self.assertEqual(report.split()[-2:], ["200", version])
                self.assertIsNotNone(upstream.finished_at)
                # Tokens come every 0.3 s: the first event reached curl seconds before the last.
                self.assertGreater(upstream.finished_at - first, 2.0)
                events, _ = parse(body)
                self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
                expected = default_reply([{"role": "user", "content": content}])
                self.assertEqual(reply_text(events), expected)
                head = Path(headers).read_text().lower()
                self.assertIn("content-type: text/event-stream", head)
                self.assertNotIn("content-encoding", head)
                await s.access_line(app_id, "complete")
                self.assertEqual(await stored(app_id), [("user", "complete", content),
                                                        ("assistant", "complete", expected)])

    @gen_test(timeout=90)
    async def test_heartbeats_outlast_nginx_read_timeout_while_the_model_loads(self):
        # nginx gives up after 2 s without a byte from chatterd; the model needs 4 s to start.
        fast_heartbeat = ("--heartbeat=0.5", "--status-grace=0.2")
        async with self.stack(read_timeout="2s", chatterd_args=fast_heartbeat) as s:
            s.double.behave("loading", header_delay=4, token_delay=0.01)
            app_id = new_id("heartbeat")
            status, body, _ = await s.curl("/llmchat", "--http2", "-N", "-X", "POST", "--data-binary",
                                           jsonfmt.dumps(chat(app_id, "are you there?", "loading")))
            self.assertEqual(status, 200, body)
            events, comments = parse(body)
            self.assertGreaterEqual(comments.count("keepalive"), 4, body)  # 0.5 s apart for 4 s
            self.assertTrue(jsonfmt.loads(events[-1].data)["done"], body)
            expected = default_reply([{"role": "user", "content": "are you there?"}])
            self.assertEqual(reply_text(events), expected)
            self.assertEqual(await stored(app_id), [("user", "complete", "are you there?"),
                                                    ("assistant", "complete", expected)])
            # The control: /llmprompt relays NDJSON, which has no heartbeat, so the same slow
            # model hits the 2 s timeout (nginx tries the second process too, then gives up).
            status, body, _ = await s.curl("/llmprompt", "-X", "POST", "--data-binary",
                                           jsonfmt.dumps({"model": "loading", "prompt": "hi"}))
            self.assertEqual(status, 504, body)
            self.assertIn("error", jsonfmt.loads(body))

    @gen_test(timeout=90)
    async def test_client_disconnect_through_nginx_stops_the_model_and_keeps_the_partial_reply(self):
        async with self.stack() as s:
            # Two tokens, then the model goes quiet ("thinking"): nothing is written to the
            # client after it leaves, so only nginx noticing the close can stop the model.
            s.double.behave("thinking", token_delay=0.2, stall_after=2)
            for flag in ("--http1.1", "--http2"):
                app_id = new_id("gone")
                content = f"leaving early over {flag}"
                stream = await s.stream(app_id, content, "thinking", flag)
                await stream.first_event()
                await stream.first_event()  # both tokens in: some text to keep
                upstream = s.upstream_request(content)
                stream.proc.kill()
                await stream.proc.wait()
                await within(upstream.closed.wait(), 5, "the model to be stopped after the client left")
                self.assertIsNone(upstream.finished_at)
                await s.access_line(app_id, "interrupted")
                rows = await stored(app_id)
                self.assertEqual([r[:2] for r in rows], [("user", "complete"), ("assistant", "interrupted")])
                full = default_reply([{"role": "user", "content": content}])
                partial = rows[1][2]
                self.assertEqual(partial, "".join(split_tokens(full)[:2]))

    @gen_test(timeout=90)
    async def test_a_stream_cut_and_resumed_through_nginx(self):
        # docs/api.md, "Resuming a stream": the client leaves after 3 events, the turn keeps
        # generating, and a resume through nginx (whichever process it reaches) gets the
        # rest as it is produced, unbuffered, each event once.
        async with self.stack() as s:
            s.double.behave("slow", token_delay=0.2)
            app_id = new_id("resume")
            content = "cut me off"
            stream = await s.stream(app_id, content, "slow", "--http2",
                                    "-H", "X-Chatterd-Keep-Generating: 30")
            seen = []
            while len(seen) < 3:
                line = await stream.line()
                if line.startswith(b"id: "):
                    seen.append(line.split(b" ", 1)[1].strip().decode())
            turn, k = seen[-1].split(":")
            await stream.line()  # the third event's data line
            stream.proc.kill()
            await stream.proc.wait()
            upstream = s.upstream_request(content)
            resumed = Stream(await asyncio.create_subprocess_exec(
                *s._curl_args(f"/turns/{turn}/events?appID={app_id}",
                              ("-N", "--http2", "-H", f"Last-Event-ID: {turn}:{k}",
                               "-w", "%{stderr}%{http_code} %{http_version}"), None),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
            s.curls.append(resumed.proc)
            await resumed.first_event()
            self.assertIsNone(upstream.finished_at, "the resumed stream waited for the whole reply")
            body, report = await resumed.finish()
            self.assertEqual(report.split()[-2:], ["200", "2"])
            events, _ = parse(body)
            ids = re.findall(rb"^id: (\d+):(\d+)$", body, re.M)
            self.assertEqual([int(n) for _, n in ids], list(range(int(k) + 1, int(k) + 1 + len(events))))
            self.assertTrue(jsonfmt.loads(events[-1].data)["done"])
            full = default_reply([{"role": "user", "content": content}])
            before = parse(stream.received[:stream.received.rindex(b"\n") + 1] + b"\n")[0]
            self.assertEqual(reply_text(before[:3]) + reply_text(events), full)
            self.assertEqual(await stored(app_id), [("user", "complete", content),
                                                    ("assistant", "complete", full)])

    @gen_test(timeout=90)
    async def test_chatterd_logs_the_clients_ip_and_ignores_forged_headers(self):
        async with self.stack() as s:
            forged = ("-H", "X-Real-IP: 6.6.6.6", "-H", "X-Forwarded-For: 7.7.7.7",
                      "-H", "X-Scheme: http")
            # From 127.0.0.2, so the client's address differs from nginx's own (127.0.0.1).
            status, _, _ = await s.curl("/getchatts", "--interface", OTHER_CLIENT, *forged)
            self.assertEqual(status, 200)
            app_id = new_id("ip")
            await s.chat(app_id, "who am I?", "llama3.2", "--interface", OTHER_CLIENT, *forged)
            status, _, _ = await s.curl("/healthz", "--http2", *forged)  # from 127.0.0.1
            self.assertEqual(status, 200)

            _, line = await wait_line(s.procs, lambda line: " GET /getchatts " in line, "/getchatts line")
            self.assertEqual(access(line)[:2], (200, OTHER_CLIENT), line)
            _, line = await s.access_line(app_id, "complete")
            self.assertEqual(access(line)[:2], (200, OTHER_CLIENT), line)
            _, line = await wait_line(s.procs, lambda line: " GET /healthz " in line, "/healthz line")
            self.assertEqual(access(line)[:2], (200, "127.0.0.1"), line)
            for p in s.procs:
                self.assertNotIn("6.6.6.6", p.log())
                self.assertNotIn("7.7.7.7", p.log())
            # The control: chatterd itself does believe these headers (it runs with
            # --xheaders), so it is nginx's overwriting them that keeps them honest.
            status, _, _ = await s.curl("/readyz", "-H", "X-Real-IP: 6.6.6.6",
                                        base=f"http://127.0.0.1:{s.a.port}")
            self.assertEqual(status, 200)
            _, line = await wait_line([s.a], lambda line: " GET /readyz " in line, "direct /readyz line")
            self.assertEqual(access(line)[:2], (200, "6.6.6.6"), line)

    @gen_test(timeout=120)
    async def test_sigterm_to_one_process_loses_no_turn_and_nginx_moves_on(self):
        async with self.stack(chatterd_args=("--shutdown-grace=10",)) as s:
            # Long turns (20 s) outlast the 10 s grace and are ended with an error event;
            # short ones (1 s) finish.  The grace leaves room for a slow CI machine.
            s.double.behave("long", token_delay=0.2, reply=" ".join(f"long{i}" for i in range(100)))
            s.double.behave("short", token_delay=0.2, reply=" ".join(f"short{i}" for i in range(6)))
            inflight = {}
            for kind in ("long", "long", "short", "short"):
                app_id = new_id(kind)
                inflight[app_id] = (kind, await s.stream(app_id, f"in flight {app_id}", kind))
                await inflight[app_id][1].first_event()
            # least_conn spreads them: one long and one short turn on each process.
            for p in (s.a, s.b):
                _, page, _ = await s.curl("/metrics", base=f"http://127.0.0.1:{p.port}")
                self.assertEqual(metric_values(page.decode())[("chatterd_active_streams", ())], 2.0,
                                 f"{p.name} is not relaying two streams")
            # An idle keep-alive connection from nginx to each process: the one to the
            # process being stopped will carry a new request to it, to be answered 503.
            for _ in range(2):
                status, _, _ = await s.curl("/healthz")
                self.assertEqual(status, 200)

            s.a.proc.send_signal(signal.SIGTERM)
            await wait_line([s.a], lambda line: "shutting down" in line, "chatterd-a draining")
            results = {}
            for app_id, (kind, stream) in inflight.items():
                if kind == "short":  # both finish within the grace, on either process
                    results[app_id] = await stream.finish()
            # Now each process relays one long turn, so nginx alternates between them.
            during = [new_id("during") for _ in range(4)]
            for app_id in during:
                await s.chat(app_id, "while a drains")
                status, _, _ = await s.curl("/readyz")
                self.assertEqual(status, 200)
            self.assertIsNone(s.a.proc.returncode, "chatterd-a exited before the turns 'during' its drain")

            self.assertEqual(await asyncio.wait_for(s.a.proc.wait(), LONG), 0, s.a.log())
            await wait_line([s.a], lambda line: line.endswith("stopped"), "chatterd-a's last line")
            after = [new_id("after") for _ in range(2)]
            for app_id in after:
                await s.chat(app_id, "after a left")

            # In-flight turns: on the process that was stopped, the short one finished and the
            # long one was ended with an error event after the grace; the other's finished.
            served_by_a = set()
            for app_id, (kind, stream) in inflight.items():
                body, _ = results[app_id] if app_id in results else await stream.finish()
                events, _ = parse(body)
                proc, line = await s.access_line(app_id)
                rows = await stored(app_id)
                self.assertEqual([r[0] for r in rows], ["user", "assistant"], app_id)
                if proc is s.a:
                    served_by_a.add(kind)
                if proc is s.a and kind == "long":
                    self.assertEqual(events[-1].event, "error", body)
                    self.assertIn("shutting down", jsonfmt.loads(events[-1].data)["error"])
                    self.assertEqual(rows[1][1], "failed")
                    self.assertTrue(rows[1][2].startswith("long0 long1"), rows[1][2])
                else:
                    self.assertTrue(jsonfmt.loads(events[-1].data)["done"], body)
                    self.assertEqual(rows[1][1:], ("complete", reply_text(events)))
            self.assertEqual(served_by_a, {"long", "short"})

            # New turns: all served by the other process, each stored exactly once ...
            for app_id in during + after:
                proc, line = await s.access_line(app_id, "complete")
                self.assertIs(proc, s.b, line)
                self.assertEqual([r[:2] for r in await stored(app_id)],
                                 [("user", "complete"), ("assistant", "complete")])
            # ... some of them after nginx met chatterd-a's 503 and tried chatterd-b.
            nginx_log = Path(s.access_log).read_text()
            self.assertIn("ustatus=503, 200", nginx_log)
            self.assertTrue(any(access(line) and access(line)[0] == 503 for line in s.a.lines), s.a.log())

    @gen_test(timeout=90)
    async def test_health_metrics_and_nginx_own_answers(self):
        async with self.stack() as s:
            for path in ("/healthz", "/readyz"):
                for flag in ("--http1.1", "--http2"):
                    status, body, _ = await s.curl(path, flag)
                    self.assertEqual(status, 200, body)
            ready = jsonfmt.loads((await s.curl("/readyz"))[1])
            self.assertEqual((ready["database"]["ok"], ready["ollama"]["ok"]), (True, True))

            # What the run does: two complete turns and one the client leaves.
            s.double.behave("slow", token_delay=0.2)
            for label in ("m1", "m2"):
                await s.chat(new_id(label), "count me")
            app_id, content = new_id("m3"), "leaving"
            stream = await s.stream(app_id, content, "slow")
            await stream.first_event()
            stream.proc.kill()
            await stream.proc.wait()
            await within(s.upstream_request(content).closed.wait(), 5, "the model to be stopped")
            await s.access_line(app_id, "interrupted")

            # Each process counts its own requests; together they count the run.
            totals: dict = {}
            for p in (s.a, s.b):
                status, page, _ = await s.curl("/metrics", base=f"http://127.0.0.1:{p.port}")
                self.assertEqual(status, 200)
                for key, value in metric_values(page.decode()).items():
                    totals[key] = totals.get(key, 0) + value
            chats = (("method", "POST"), ("route", "/llmchat"), ("status", "200"))
            self.assertEqual(totals[("chatterd_requests_total", chats)], 3)
            self.assertEqual(totals[("chatterd_client_disconnects_total", ())], 1)
            self.assertEqual(totals[("chatterd_active_streams", ())], 0)
            turns = "chatterd_stream_duration_seconds_count"
            self.assertEqual(totals[(turns, (("outcome", "complete"),))], 2)
            self.assertEqual(totals[(turns, (("outcome", "interrupted"),))], 1)
            self.assertGreater(totals[("chatterd_tokens_relayed_total", ())], 20)

            # /metrics is not public through nginx (only from the machine itself) ...
            for path in ("/metrics", "/metrics/", "//metrics"):
                status, _, _ = await s.curl(path, "--path-as-is", "--interface", OTHER_CLIENT)
                self.assertEqual(status, 403, path)
            status, page, _ = await s.curl("/metrics")
            self.assertEqual(status, 200)
            self.assertIn(b"chatterd_requests_total", page)

            # nginx's own answers: plain HTTP moves to https, and too large a body is
            # refused in chatterd's JSON error style.
            status, _, _ = await s.curl("/getchatts", base=f"http://127.0.0.1:{s.http_port}")
            self.assertEqual(status, 301)
            big = os.path.join(s.dir, "big.json")
            Path(big).write_bytes(b'{"x": "' + b"a" * (1 << 20) + b'"}')
            status, body, _ = await s.curl("/postchatt", "-X", "POST", "--data-binary", f"@{big}",
                                           "-H", "Content-Type: application/json")
            self.assertEqual(status, 413)
            self.assertIn("larger than", jsonfmt.loads(body)["error"])

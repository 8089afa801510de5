"""People against the real process: `python chatterd.py` on the run's PostgreSQL.

--add-user reading the password from standard input; logs of a run that used passwords,
tokens and cookies holding none of them; and streams that keep flowing while 50 logins
hash their passwords (the login-storm figure).
"""

import asyncio
import re
import statistics
import sys
import time

import asyncpg
from tornado.testing import AsyncTestCase, gen_test

import jsonfmt
from accounts.passwords import PasswordHasher
from accounts.policy import SESSION_COOKIE
from tests.support import database_url
from tests.test_process import ROOT, start_chatterd, stop, unused_port

PASSWORD = "correct horse battery"


async def clear_accounts() -> None:
    con = await asyncpg.connect(database_url())
    try:
        await con.execute("TRUNCATE chatterd.users, chatterd.login_throttle CASCADE")
    finally:
        await con.close()


async def add_user(name: str, stdin: bytes, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "chatterd.py", "--database-url", database_url(), "--add-user", name, *args,
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode, out.decode(), err.decode()


async def exchange(port: int, method: str, path: str, body: object = None,
                   headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request on its own connection: (status, headers (last value wins,
    Set-Cookie kept whole), body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b"" if body is None else jsonfmt.dumpb(body)
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(head.encode() + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    try:
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    found = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), found, rest


def session_from(headers: dict) -> str:
    m = re.match(re.escape(SESSION_COOKIE) + r"=([^;]+)", headers.get("set-cookie", ""))
    assert m, headers
    return m.group(1)


class AddUserTest(AsyncTestCase):
    @gen_test(timeout=180)
    async def test_add_user_reads_stdin_works_with_signup_closed_and_fails_in_one_line(self):
        await clear_accounts()
        code, out, err = await add_user("Ada", f"{PASSWORD}\n".encode())
        self.assertEqual(code, 0, err)
        self.assertIn("added user 'Ada'", out)
        self.assertNotIn(PASSWORD, out + err)
        failures = [("ada", f"{PASSWORD}\n".encode(), "the username 'ada' is taken"),
                    ("two words", f"{PASSWORD}\n".encode(), "username may hold only letters"),
                    ("bob", b"short\n", "password must be at least 8 characters"),
                    ("bob", b"", "password must be at least 8 characters")]
        for name, stdin, expected in failures:
            code, out, err = await add_user(name, stdin)
            self.assertEqual(code, 1, (name, err))
            self.assertEqual(err.count("\n"), 1, err)  # one line, no traceback
            self.assertIn(expected, err)
        proc, port = await start_chatterd("--database-url", database_url(), "--signup", "closed",
                                          "--ollama-url", "http://127.0.0.1:9")
        try:
            status, _, body = await exchange(port, "POST", "/auth/signup", {"username": "eve", "password": PASSWORD})
            self.assertEqual(status, 403, body)
            status, headers, body = await exchange(port, "POST", "/auth/login", {"username": "ADA", "password": PASSWORD})
            self.assertEqual((status, jsonfmt.loads(body)), (200, {"username": "Ada"}))
            self.assertTrue(session_from(headers))
        finally:
            await stop(proc)

    @gen_test(timeout=60)
    async def test_bad_account_settings_are_one_line(self):
        for args, expected in ((("--auth", "maybe"), "--auth must be open or required"),
                               (("--signup", "sometimes"), "--signup must be open or closed"),
                               (("--session-idle", "0"), "--session-idle must be more than 0"),
                               (("--user-streams", "-1"), "--user-streams must be 0")):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "chatterd.py", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            self.assertEqual(proc.returncode, 1)
            self.assertEqual(err.decode().count("\n"), 1, err)
            self.assertIn(expected, err.decode())


class SecretsNotLoggedTest(AsyncTestCase):
    @gen_test(timeout=180)
    async def test_the_logs_of_a_run_that_used_every_secret_hold_none_of_them(self):
        await clear_accounts()
        proc, port = await start_chatterd("--database-url", database_url(),
                                          "--ollama-url", "http://127.0.0.1:9", "--login-attempts", "2")
        secrets = [PASSWORD, "a new password 2", "wrong guess 1", "wrong guess 2", "wrong guess 3"]
        try:
            status, headers, _ = await exchange(port, "POST", "/auth/signup", {"username": "ada", "password": PASSWORD})
            self.assertEqual(status, 201)
            session = first_session = session_from(headers)
            same = {"Cookie": f"{SESSION_COOKIE}={session}", "Sec-Fetch-Site": "same-origin"}
            status, _, body = await exchange(port, "POST", "/auth/tokens", {"name": "t"}, same)
            self.assertEqual(status, 201)
            token = jsonfmt.loads(body)["token"]
            status, headers, _ = await exchange(port, "POST", "/auth/password",
                                                {"password": PASSWORD, "new_password": secrets[1]}, same)
            self.assertEqual(status, 204)
            session = session_from(headers)
            same["Cookie"] = f"{SESSION_COOKIE}={session}"
            for guess in secrets[2:]:
                await exchange(port, "POST", "/auth/login", {"username": "ada", "password": guess})
            forged_token = "chd_" + "A" * 43
            forged_cookie = "B" * 43
            requests = [
                ("GET", "/auth/me", None, {"Authorization": f"Bearer {token}"}),
                ("GET", "/auth/me", None, {"Authorization": f"Bearer {forged_token}"}),
                ("GET", "/auth/me", None, {"Authorization": "Bearer chd_malformed-secret-value"}),
                ("GET", "/getchatts?token=" + token, None, {"Authorization": "Bearer sk-none-dummy-key"}),
                ("GET", "/auth/me", None, {"Cookie": f"{SESSION_COOKIE}={forged_cookie}"}),
                ("POST", "/postchatt", {"name": "a", "message": "b"}, {"Cookie": f"{SESSION_COOKIE}={session}",
                                                                     "Origin": "http://evil.example"}),
                ("POST", "/auth/password", {"password": "wrong guess 1", "new_password": "x"}, same),
                ("POST", "/auth/login", b'{"username": "ada", "password": "wrong guess 3', {}),
            ]
            # Malformed HTTP (a control character in the header value): Tornado refuses it
            # before any handler runs, in a log line that would quote the value.
            for raw in (b"Authorization: Bearer " + token.encode() + b"\x01",
                        f"Cookie: {SESSION_COOKIE}={session}".encode() + b"\x02",
                        b"Authorization: Basic c2VjcmV0LWJhc2ljLXZhbHVl\x03"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /auth/me HTTP/1.1\r\nHost: x\r\n" + raw + b"\r\n\r\n")
                self.assertIn(b" 400 ", await reader.read())
                writer.close()
            for method, path, body, headers in requests:
                if isinstance(body, bytes):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    await reader.read()
                    writer.close()
                    continue
                await exchange(port, method, path, body, headers)
        finally:
            await stop(proc)
        log = "".join(proc.log)
        self.assertIn("POST /auth/login", log)  # the log is there, and saw these requests
        self.assertIn("GET /auth/me", log)
        self.assertIn("Malformed HTTP message", log)
        for secret in [*secrets, first_session, session, token, token[4:], forged_token, forged_cookie, "sk-none-dummy-key",
                       "chd_malformed-secret-value", "c2VjcmV0LWJhc2ljLXZhbHVl"]:
            self.assertNotIn(secret, log, f"logged: {secret[:6]}…")
        self.assertNotIn("Traceback", log)


class LoginStormTest(AsyncTestCase):
    """50 streams relaying a token every 20 ms while 50 users log in at once."""

    STREAMS = 50
    LOGINS = 50
    TOKEN_DELAY = 0.02

    @gen_test(timeout=300)
    async def test_streams_keep_flowing_during_a_login_storm(self):
        await clear_accounts()
        double_port = unused_port()
        double = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.ollama_double", "--port", str(double_port),
            "--token-delay", str(self.TOKEN_DELAY), cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            while b"listening" not in await asyncio.wait_for(double.stderr.readline(), 30):
                pass
            proc, port = await start_chatterd("--database-url", database_url(),
                                              "--ollama-url", f"http://127.0.0.1:{double_port}",
                                              "--db-pool-size", "20")
            try:
                await self.storm(port)
            finally:
                await stop(proc)
        finally:
            double.terminate()
            await double.wait()

    async def storm(self, port: int) -> None:
        names = [f"storm{i}" for i in range(self.LOGINS)]
        signups = await asyncio.gather(*(exchange(port, "POST", "/auth/signup", {"username": n, "password": PASSWORD})
                                         for n in names))
        self.assertEqual({s for s, _, _ in signups}, {201})
        loop = asyncio.get_running_loop()
        arrivals: list[list[float]] = [[] for _ in range(self.STREAMS)]
        long_message = " ".join(f"word{i}" for i in range(600))  # the double quotes it: ~12 s of tokens
        started = [asyncio.Event() for _ in range(self.STREAMS)]

        async def stream(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = jsonfmt.dumpb({"appID": f"storm-{i}", "model": "llama3.2", "stream": True,
                                     "messages": [{"role": "user", "content": long_message}]})
            writer.write(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(payload), payload))
            try:
                while data := await reader.read(65536):
                    if b"data: " in data:
                        arrivals[i].append(loop.time())
                        started[i].set()
            finally:
                writer.transport.abort()

        streams = [asyncio.ensure_future(stream(i)) for i in range(self.STREAMS)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            await asyncio.sleep(0.5)  # a stretch of streaming without logins, for comparison
            storm_start = loop.time()
            latencies = []
            # This process's own loop lag: a gap it causes is the client's, not chatterd's.
            lags = []
            ticking = True

            async def ticker() -> None:
                last = loop.time()
                while ticking:
                    await asyncio.sleep(0.005)
                    now = loop.time()
                    lags.append(now - last - 0.005)
                    last = now

            ticks = asyncio.ensure_future(ticker())

            async def login(name: str) -> int:
                t0 = loop.time()
                status, _, _ = await exchange(port, "POST", "/auth/login", {"username": name, "password": PASSWORD})
                latencies.append(loop.time() - t0)
                return status

            statuses = await asyncio.gather(*(login(n) for n in names))
            storm_end = loop.time()
            ticking = False
            await ticks
            await asyncio.sleep(0.3)
            self.assertEqual(set(statuses), {200})
            during, before = [], []
            for times in arrivals:
                for a, b in zip(times, times[1:]):
                    if b >= storm_start and a <= storm_end:
                        during.append(b - a)
                    elif b < storm_start:
                        before.append(b - a)
                self.assertGreater(times[-1], storm_end, "a stream ended before the storm did")
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)

        async with PasswordHasher(workers=1) as hasher:
            t = []
            for i in range(5):
                t0 = time.perf_counter()
                await hasher.hash(f"password {i}")
                t.append(time.perf_counter() - t0)
        print(f"\nlogin storm: {self.LOGINS} logins in {(storm_end - storm_start) * 1000:.0f} ms "
              f"(each {min(latencies) * 1000:.0f}-{max(latencies) * 1000:.0f} ms) while {self.STREAMS} "
              f"streams relayed a token every {self.TOKEN_DELAY * 1000:.0f} ms: largest gap between "
              f"events {max(during) * 1000:.1f} ms (p99 {statistics.quantiles(during, n=100)[98] * 1000:.1f} ms; "
              f"before the storm {max(before) * 1000:.1f} ms; the client's own largest loop lag "
              f"{max(lags) * 1000:.1f} ms); one Argon2id hash "
              f"(19 MiB, t=2, p=1) {statistics.median(t) * 1000:.1f} ms")
        self.assertGreater(storm_end - storm_start, 0.2)  # long enough for the figure to mean something
        self.assertLess(max(during), 0.25)

"""Test machinery for people: a chatterd test case with accounts (real hashing workers, real
PostgreSQL), and a client that keeps a session cookie as a browser would."""

import asyncio
import json
import re
from typing import Any, Optional

import asyncpg

import jsonfmt
from accounts.limits import CallerLimits
from accounts.passwords import PasswordHasher
from accounts.policy import SESSION_COOKIE, AuthPolicy
from chatterd import Application
from tests.support import ChatterdTestCase, database_url

PASSWORD = "correct horse battery"
_COOKIE = re.compile(re.escape(SESSION_COOKIE) + r"=([^;]*)")


def session_of(response: Any) -> Optional[str]:
    """The session id a response sets ("" when it clears the cookie), None if it sets none."""
    for header in response.headers.get_list("Set-Cookie"):
        m = _COOKIE.match(header)
        if m:
            value = m.group(1)
            return "" if "expires=" in header.lower() and value in ("", '""') else value
    return None


class PeopleTestCase(ChatterdTestCase):
    """ChatterdTestCase with a password hasher and account settings (class attributes)."""

    auth = AuthPolicy()
    user_streams = 0
    user_rate = 0
    xheaders = False

    def get_app(self) -> Application:
        app = super().get_app()
        self.hasher = PasswordHasher(workers=2)
        self.io_loop.run_sync(self.hasher.start, timeout=60)
        app.auth, app.hasher = self.auth, self.hasher
        app.caller_limits = CallerLimits(self.user_streams, self.user_rate)
        return app

    def get_httpserver_options(self) -> dict:
        return {"xheaders": self.xheaders}

    async def truncate(self) -> None:
        await super().truncate()
        con = await asyncpg.connect(database_url())
        try:
            await con.execute("TRUNCATE chatterd.users, chatterd.login_throttle CASCADE")
        finally:
            await con.close()

    def tearDown(self) -> None:
        self.io_loop.run_sync(self.hasher.close)
        super().tearDown()

    # -- a client ----------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, *, session: Optional[str] = None,
             token: Optional[str] = None, site: Optional[str] = "same-origin",
             headers: Optional[dict] = None) -> Any:
        """One request; with *session* it carries the cookie and (as a browser does)
        Sec-Fetch-Site: *site*; with *token* an Authorization: Bearer header."""
        all_headers = dict(headers or {})
        if session is not None:
            all_headers["Cookie"] = f"{SESSION_COOKIE}={session}"
            if site is not None:
                all_headers.setdefault("Sec-Fetch-Site", site)
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)  # \u escapes: lone surrogates can be sent
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        return self.fetch(path, method=method, body=body, headers=all_headers, raise_error=False,
                          allow_nonstandard_methods=True)

    def signup(self, name: str, password: str = PASSWORD) -> str:
        """A new account; its session id."""
        response = self.call("POST", "/auth/signup", {"username": name, "password": password})
        assert response.code == 201, (response.code, response.body)
        session = session_of(response)
        assert session
        return session

    def login(self, name: str, password: str = PASSWORD, **kwargs: Any) -> Any:
        return self.call("POST", "/auth/login", {"username": name, "password": password}, **kwargs)

    def new_token(self, session: str, name: str = "script", **fields: Any) -> dict:
        response = self.call("POST", "/auth/tokens", {"name": name, **fields}, session=session)
        assert response.code == 201, (response.code, response.body)
        return jsonfmt.loads(response.body)

    def sql(self, query: str, *args: Any) -> Any:
        return self.io_loop.run_sync(lambda: self.pool.fetch(query, *args))


def error(response: Any) -> str:
    body = jsonfmt.loads(response.body)
    assert list(body) == ["error"], body
    return body["error"]


async def open_stream(port: int, body: dict, headers: dict, path: bytes = b"/llmchat"
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A raw client: send the request and read until the first event (or the whole answer
    when it is not a stream); return the open connection and what was read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = jsonfmt.dumpb(body)
    extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + extra + b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    seen = b""
    while b"data: " not in seen:
        data = await asyncio.wait_for(reader.read(4096), 10)
        if not data:
            break
        seen += data
        if seen.startswith(b"HTTP/1.1 4") and b"\r\n\r\n" in seen:
            head, _, rest = seen.partition(b"\r\n\r\n")
            m = re.search(rb"Content-Length: (\d+)", head, re.I)
            if m and len(rest) >= int(m.group(1)):
                break
    return reader, writer, seen

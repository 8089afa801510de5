"""Fuzzing every POST endpoint of a real chatterd (real PostgreSQL, the Ollama double,
real password hashing workers), and every endpoint with hostile Cookie and Authorization headers.

Hypothesis writes the request as JSON *text*, because the hostile values live only there:
NaN, 1e400, 20-digit integers, "\\ud800" escapes, NUL, nesting past any limit.  Bodies are
valid-shaped with hostile leaves, raw byte garbage, or carried by hostile framing headers
on a raw socket.  Whatever arrives, chatterd must answer 2xx or a 4xx whose body is
{"error": "<non-empty>"}, log no error or traceback, and store nothing when it refuses.

CI runs a few hundred examples (~30 s); CHATTERD_FUZZ_EXAMPLES=5000 runs that many per test.
"""

import asyncio
import json
import os
from typing import Any, Optional

from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st

import jsonfmt
from accounts.credentials import credential_hash, new_api_token, new_session_id
from accounts.policy import SESSION_COOKIE
from tests.people import PASSWORD, PeopleTestCase
from tests.support import streams_finished

SCALE = int(os.environ.get("CHATTERD_FUZZ_EXAMPLES", "0"))
# No shrinking: a failure can leave the server changed (a request stuck in flight), which
# fails every later example too, slowly; the first failing example is reported as drawn.
FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True, report_multiple_bugs=False,
                phases=(Phase.explicit, Phase.reuse, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])


def examples(ci: int) -> settings:
    return settings(FUZZ, max_examples=SCALE or ci)


PATHS = ("/llmchat", "/llmtools", "/llmprep", "/llmprompt", "/postchatt", "/auth/signup",
         "/auth/login", "/auth/password", "/auth/tokens")
MAX_BODY_SIZE = 1 << 20  # FuzzTest's --max-body-size

# -- JSON text with hostile leaves ---------------------------------------------------

HOSTILE_CHARS = ("\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\u2028", "\ufeff", "\uffff",
                 "\U0010ffff", "😀", "é", '"', "\\", "/", "\n", "\t", "\x7f", "\x1f")
# Mostly clean text, so that whole bodies get through and are stored and sent too.
clean_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24)
hostile_texts = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(HOSTILE_CHARS)),
                        min_size=1, max_size=24)
texts = st.one_of(clean_texts, clean_texts, clean_texts, hostile_texts)


@st.composite
def json_strings(draw: Any, text: Any = texts) -> str:
    """A JSON string literal: \\u escapes (lone surrogates become "\\ud800") or raw
    characters (a lone surrogate then becomes invalid UTF-8 in the body)."""
    return json.dumps(draw(text), ensure_ascii=draw(st.booleans()))


NUMBER_TEXTS = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "1E+999", "-0", "0e0",
                "9223372036854775807", "9223372036854775808", "-9223372036854775808",
                "-9223372036854775809", "18446744073709551616", "1" + "0" * 30, "1" + "0" * 5000,
                "01", "1.", "1.5e308", "2.5e308", "123456789.123456789e300")
numbers = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1).map(str),
                    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
                    st.integers().map(str), st.sampled_from(NUMBER_TEXTS))
leaves = st.one_of(json_strings(), numbers, st.sampled_from(("true", "false", "null")))


def array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def obj(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


nested = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(array),
    st.lists(st.tuples(json_strings(), inner), max_size=4).map(obj)), max_leaves=12)
deep = st.tuples(st.integers(1, 1100), st.sampled_from(("[", '{"a":'))).map(
    lambda d: d[1] * d[0] + "1" + ("]" if d[1] == "[" else "}") * d[0])
huge_array = st.integers(0, 5000).map(lambda n: array(["0"] * n))
values = st.one_of(*[nested] * 6, leaves, leaves, deep, huge_array)
hostile_values = st.one_of(json_strings(hostile_texts), st.sampled_from(NUMBER_TEXTS), deep, huge_array, values)


# -- valid bodies, then at most one hostile change -----------------------------------

clean_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1),
              st.floats(allow_nan=False, allow_infinity=False), clean_texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(clean_texts, inner, max_size=3)),
    max_leaves=8)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(("system", "user", "assistant", "tool", "User")), "content": clean_texts},
    optional={"images": st.lists(clean_texts, max_size=2), "thinking": clean_texts, "tool_name": clean_texts,
              "tool_calls": st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
                  {"name": clean_texts, "arguments": st.dictionaries(clean_texts, clean_json, max_size=2)})}),
                  max_size=2)})
models = st.sampled_from(("llama3.2", "qwen3:8b"))
ollama_fields = {"stream": st.booleans(), "keep_alive": st.sampled_from((0, 300, "5m")), "think": st.booleans(),
                 "options": st.dictionaries(st.sampled_from(("temperature", "seed", "num_ctx", "stop")),
                                            clean_json, max_size=3),
                 "format": clean_json}
VALID = {
    "/llmchat": st.fixed_dictionaries(
        {"appID": st.text("abcdefxyz-.", min_size=1, max_size=20), "model": models,
         "messages": st.lists(message, min_size=1, max_size=3)}, optional=ollama_fields),
    "/llmprompt": st.fixed_dictionaries({"model": models, "prompt": clean_texts}, optional=ollama_fields),
    "/postchatt": st.fixed_dictionaries({"name": st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                                                         min_size=1, max_size=64),
                                         "message": clean_texts}),
}
VALID["/llmprep"] = VALID["/llmchat"]
# Accounts: names and passwords mostly within the rules, so that many get through.
usernames = st.text(st.characters(categories=("L", "N")) | st.sampled_from("._-@"), min_size=1, max_size=64)
passwords = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=8, max_size=40)
VALID["/auth/signup"] = st.fixed_dictionaries({"username": usernames, "password": passwords})
VALID["/auth/login"] = VALID["/auth/signup"]
VALID["/auth/password"] = st.fixed_dictionaries({"password": passwords, "new_password": passwords})
VALID["/auth/tokens"] = st.fixed_dictionaries({"name": clean_texts},
                                              optional={"expires_in_days": st.integers(-5, 4000)})
# /llmtools: llmchat's body plus the client's tool schemas.
tool_schema = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text("abcdefgh_", min_size=1, max_size=12), "description": clean_texts},
    optional={"parameters": st.just({"type": "object", "properties": {"x": {"type": "string"}}})})})
VALID["/llmtools"] = st.fixed_dictionaries(
    {"appID": st.text("abcdefxyz-.", min_size=1, max_size=20), "model": models,
     "messages": st.lists(message, min_size=1, max_size=3)},
    optional={**ollama_fields, "tools": st.lists(tool_schema, max_size=2)})
VALUE_MARK, KEY_MARK = "\x01value\x01", "\x01key\x01"  # json.dumps writes them the same either way


def nodes(value: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value inside *value*, at any depth."""
    children = list(value.items()) if isinstance(value, dict) else \
        list(enumerate(value)) if isinstance(value, list) else []
    found = []
    for key, child in children:
        found.append((value, key))
        found.extend(nodes(child))
    return found


@st.composite
def bodies(draw: Any, path: str) -> str:
    """A valid body for *path* as JSON text, with nothing, one value anywhere replaced by
    hostile text, one hostile key added, one field dropped, or 1,001 messages."""
    body = draw(VALID[path])
    change = draw(st.sampled_from(("value", "key", "none", "value", "drop", "many", "value")))
    inside = nodes(body)
    if change == "value":
        container, key = draw(st.sampled_from(inside))
        container[key] = VALUE_MARK
    elif change == "key":
        containers = [body] + [c[k] for c, k in inside if isinstance(c[k], dict)]
        draw(st.sampled_from(containers))[KEY_MARK] = VALUE_MARK
    elif change == "drop":
        container, key = draw(st.sampled_from(inside))
        del container[key]
    elif change == "many" and "messages" in body:
        body["messages"] = [{"role": "user", "content": "x"}] * draw(st.sampled_from((1000, 1001)))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    text = text.replace(json.dumps(VALUE_MARK), draw(hostile_values), 1)
    return text.replace(json.dumps(KEY_MARK), draw(json_strings(hostile_texts)), 1)


requests = st.sampled_from(PATHS).flatmap(lambda path: st.tuples(st.just(path), bodies(path)))


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a raw lone surrogate: invalid UTF-8, on purpose


CONTENT_TYPES = ("application/json", "text/plain", "application/json; charset=latin-1",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=xx", "*/*", "")

# -- raw framing headers ------------------------------------------------------------

LENGTHS = ("²", "١", "9" * 5000, "9" * 19, "1" + "0" * 17, "-1", "", " ", "0x10", "1e3", "5, 5",
           "5,6", "+5", "0", "2000000")


@st.composite
def framings(draw: Any, body: bytes) -> bytes:
    """Framing headers plus the body bytes: the framing may be invalid, but the message is
    always complete (a server rightly waits for bytes a client announced and never sent)."""
    headers = []
    # Hypothesis starts from (and shrinks towards) the first choice: the honest one.
    length = draw(st.one_of(st.just(str(len(body))), st.sampled_from(LENGTHS), st.just(None)))
    coding = draw(st.one_of(st.just(None),
                            st.sampled_from(("chunked", "Chunked", "gzip", "chunked, gzip", "identity", ""))))
    if length is not None:
        headers.append(b"Content-Length: " + length.encode())
    if coding is not None:
        headers.append(b"Transfer-Encoding: " + coding.encode())
    for name, value in draw(st.lists(st.sampled_from((
            ("Content-Type", "application/json"), ("Content-Type", "text/plain; charset=\u00ff"),
            ("Expect", "100-continue"), ("Content-Encoding", "gzip"), ("Content-Type", "multipart/form-data; boundary=b"))),
            max_size=2)):
        headers.append(name.encode() + b": " + value.encode("latin-1"))
    if length is None and coding is not None and coding.lower() == "chunked":
        chunk = draw(st.integers(1, 64))
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + chunk]), body[i:i + chunk])
                        for i in range(0, len(body), chunk)) + b"0\r\n\r\n"
    elif length is not None and length.isascii() and length.isdigit() and len(length) <= 18:
        if int(length) > MAX_BODY_SIZE:
            body = b""  # refused on the headers: a client sending it anyway may be reset (RST)
        else:
            body = body.ljust(int(length), b" ")  # never leave the server waiting for bytes
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """Send the bytes (the server closes after its answer); return its final status,
    headers and body as sent (not de-chunked)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.transport.abort()
    while data.startswith(b"HTTP/1.1 100"):  # Expect: 100-continue
        data = data.split(b"\r\n\r\n", 1)[1]
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head, "the server closed the connection without an answer"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if "content-length" in headers:
        payload = payload[:int(headers["content-length"])]
    return int(status_line.split(" ")[1]), headers, payload


# -- credentials: hostile Cookie and Authorization headers on every endpoint ---------------

ENDPOINTS = [("POST", p) for p in PATHS] + [
    ("GET", "/"), ("GET", "/getchatts"), ("GET", "/auth/me"), ("GET", "/auth/tokens"), ("POST", "/auth/logout"),
    ("DELETE", "/auth/me"), ("DELETE", "/auth/tokens/1"), ("GET", "/healthz"), ("GET", "/v1/models")]
# HTTP field values: visible bytes, space, tab and obs-text (0x80-0xff); a control character
# is malformed HTTP, which Tornado answers with a bare 400 before any handler runs.
_CONTROL = bytes(c for c in range(32) if c != 9) + b"\x7f"


def field_value(raw: bytes) -> bytes:
    return raw.translate(None, _CONTROL)


header_bytes = st.binary(max_size=80).map(field_value)
header_texts = st.text(max_size=60).map(lambda t: field_value(t.encode("utf-8", "surrogatepass")))
# The live session and token of the test's user, and forged ones, stand in for these marks.
LIVE_SESSION, LIVE_TOKEN = "\x01session", "\x01token"
cookie_values = st.one_of(
    st.sampled_from((LIVE_SESSION, "", '""', "x", new_session_id(), "A" * 43 + "=", "%41" * 43)),
    header_texts.map(lambda b: b.decode("latin-1")))
cookies = st.one_of(
    header_bytes, header_texts,
    cookie_values.map(lambda v: f"{SESSION_COOKIE}={v}".encode("latin-1", "replace")),
    st.tuples(cookie_values, cookie_values).map(
        lambda vs: f"a=b; {SESSION_COOKIE}={vs[0]}; {SESSION_COOKIE}={vs[1]}".encode("latin-1", "replace")))
authorizations = st.one_of(
    header_bytes, header_texts,
    st.sampled_from(("Bearer " + LIVE_TOKEN, "Bearer sk-none", "Bearer", "Bearer ", "bearer chd_", "Basic chd_x",
                     "Bearer " + new_api_token(), "Bearer chd_" + "\u00e9" * 43, LIVE_TOKEN,
                     "Bearer " + LIVE_TOKEN + " extra")).map(lambda v: v.encode("utf-8")),
    header_texts.map(lambda b: b"Bearer chd_" + b))
browser_headers = st.dictionaries(st.sampled_from(("Sec-Fetch-Site", "Origin", "X-Forwarded-Proto")),
                                  st.one_of(st.sampled_from(("same-origin", "none", "cross-site", "http://fuzz",
                                                             "null", "https")), header_texts), max_size=2)



class FuzzTest(PeopleTestCase):
    settings_overrides = {"max_messages": 1000, "max_body_size": MAX_BODY_SIZE}

    def answer_is_clean(self, status: int, content_type: Optional[str], payload: bytes,
                        before: tuple, what: Any) -> None:
        event(f"status {status}")  # pytest --hypothesis-show-statistics: how much got through
        self.assertTrue(200 <= status < 300 or 400 <= status < 500, (status, payload[:300], what))
        if status >= 400:
            self.assertEqual(content_type, "application/json", what)
            error = jsonfmt.loads(payload)
            self.assertEqual(list(error), ["error"], what)
            self.assertIsInstance(error["error"], str)
            self.assertTrue(error["error"].strip(), what)
            self.assertEqual(self.stored(), before, f"a refused request changed the database: {what!r}")

    def stored(self) -> tuple:
        """The conversations and the board, in short: a refused request must not change them.
        (A refused turn's messages are kept, but as a rejected turn: never in a conversation.)"""
        return tuple(self.io_loop.run_sync(lambda: self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM messages m JOIN turns t ON t.id = m.turn_id"
            "         WHERE t.status IN ('complete', 'interrupted', 'failed')),"
            " (SELECT max(m.seq) FROM messages m JOIN turns t ON t.id = m.turn_id"
            "   WHERE t.status IN ('complete', 'interrupted', 'failed')),"
            " (SELECT count(*) FROM chatts), (SELECT max(seq) FROM chatts),"
            " (SELECT count(*) FROM users), (SELECT max(id) FROM users),"
            " (SELECT count(*) FROM sessions), (SELECT count(*) FROM api_tokens),"
            " (SELECT count(*) FROM api_tokens WHERE revoked_at IS NOT NULL),"
            " (SELECT string_agg(password_hash, ',' ORDER BY id) FROM users)")))

    def settle(self) -> None:
        """Let every request finish (and store) before the next example looks at the tables."""
        self.io_loop.run_sync(lambda: streams_finished(self._app, 5))

    def post(self, path: str, body: bytes, content_type: str, what: Any) -> None:
        before = self.stored()
        with self.assertNoLogs(level="ERROR"):
            response = self.fetch(path, method="POST", body=body, raise_error=False,
                                  headers={"Content-Type": content_type} if content_type else None)
            self.settle()
        self.answer_is_clean(response.code, response.headers.get("Content-Type"), response.body,
                             before, what)

    @given(request=requests, content_type=st.sampled_from(CONTENT_TYPES))
    @examples(300)
    def test_json_bodies_with_hostile_values(self, request: tuple[str, str], content_type: str) -> None:
        path, text = request
        self.post(path, encode(text), content_type, text[:2000])

    @given(path=st.sampled_from(PATHS),
           body=st.one_of(st.binary(max_size=300),
                          st.tuples(bodies("/llmchat"), st.integers(0, 200)).map(
                              lambda t: encode(t[0])[:t[1]]),  # cut short
                          st.sampled_from((b"", b"\xff\xfe{}", b'\xef\xbb\xbf{"a":1}', b"{}" * 3, b"null",
                                           b'{"a":1}garbage', b"[" * 5000, b'{"a":"\xc3"}'))))
    @examples(100)
    def test_raw_byte_garbage(self, path: str, body: bytes) -> None:
        self.post(path, body, "application/json", body[:2000])

    @given(path=st.sampled_from(PATHS), data=st.data())
    @examples(150)
    def test_framing_headers(self, path: str, data: Any) -> None:
        body = encode(data.draw(bodies(path)))
        request = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
                   + data.draw(framings(body)))
        before = self.stored()
        with self.assertNoLogs(level="ERROR"):
            status, headers, payload = self.io_loop.run_sync(
                lambda: raw_exchange(self.get_http_port(), request), timeout=30)
            self.settle()
        self.answer_is_clean(status, headers.get("content-type"), payload, before, request[:2000])

    def live_credentials(self) -> tuple[str, str]:
        """A fresh session and token of the test's one user (made in SQL: no hash per example)."""
        session, token = new_session_id(), new_api_token()

        async def make() -> None:
            user = await self.pool.fetchval("SELECT id FROM users WHERE username = 'fuzz'")
            if user is None:
                user = await self.pool.fetchval(
                    "INSERT INTO users (username, username_key, password_hash) VALUES ('fuzz', 'fuzz', $1)"
                    " RETURNING id", await self.hasher.hash(PASSWORD))
            await self.pool.execute("INSERT INTO sessions (id_hash, user_id, expires_at)"
                                    " VALUES ($1, $2, now() + interval '1 hour')", credential_hash(session), user)
            await self.pool.execute("INSERT INTO api_tokens (user_id, name, token_hash) VALUES ($1, 'fuzz', $2)",
                                    user, credential_hash(token))

        self.io_loop.run_sync(make)
        return session, token

    @given(endpoint=st.sampled_from(ENDPOINTS), cookie=st.one_of(st.none(), cookies),
           authorization=st.one_of(st.none(), authorizations), browser=browser_headers, data=st.data())
    @examples(300)
    def test_credential_headers(self, endpoint: tuple[str, str], cookie: Optional[bytes],
                                authorization: Optional[bytes], browser: dict, data: Any) -> None:
        method, path = endpoint
        session, token = self.live_credentials()
        headers = []
        for name, value in (("Cookie", cookie), ("Authorization", authorization)):
            if value is not None:
                value = value.replace(LIVE_SESSION.encode(), session.encode()).replace(LIVE_TOKEN.encode(), token.encode())
                headers.append(name.encode() + b": " + value)
        headers += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode("latin-1")) for k, v in browser.items()]
        body = encode(data.draw(bodies(path))) if path in VALID else b"{}"
        request = (method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
                   + b"".join(h + b"\r\n" for h in headers)
                   + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        before = self.stored()
        with self.assertNoLogs(level="ERROR"):
            status, answer_headers, payload = self.io_loop.run_sync(
                lambda: raw_exchange(self.get_http_port(), request), timeout=30)
            self.settle()
        if path.startswith("/v1/") and status >= 400:  # OpenAI's error shape: {"error": {...}}
            self.assertIn("error", jsonfmt.loads(payload))
            return
        self.answer_is_clean(status, answer_headers.get("content-type"), payload, before, request[:2000])
        if status == 401 and authorization is not None and b"chd_" in authorization:
            self.assertIn("invalid_token", answer_headers.get("www-authenticate", ""))

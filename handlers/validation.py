"""Validation of what a client sends: ClientError (a 4xx with a JSON message), and checks of
text and JSON values (depth, size, numbers, strings no framing or database can mangle)."""

import json
import math
import re
from typing import Any, Optional

from tornado.web import HTTPError


class ClientError(HTTPError):
    """Raise to answer `status` with {"error": message}; logged as one line, no traceback."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(status)
        self.message = message
        self.headers = headers  # sent with the error answer (Retry-After, WWW-Authenticate)




def text_problem(value: str) -> Optional[str]:
    """Why PostgreSQL could not store (or UTF-8 not carry) *value*, or None if it can."""
    if "\x00" in value:
        return "contains a NUL character, which cannot be stored"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # ujson decodes "\ud800" to a lone surrogate without complaint
        return "is not valid Unicode (lone surrogate)"
    return None


def valid_text(value: Any, where: str) -> str:
    """*value* if it is a string PostgreSQL can store, else ClientError(422) naming *where*."""
    if not isinstance(value, str):
        raise ClientError(422, f"{where} must be a string")
    problem = text_problem(value)
    if problem:
        raise ClientError(422, f"{where} {problem}")
    return value


MAX_DEPTH = 64
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def check_json(value: Any, where: str = "") -> None:
    """Refuse (ClientError 422, naming the path) any value we could not store or send on.

    Walks the whole decoded body: every string and key must be storable text (no NUL,
    no lone surrogate), every number a finite float or an int64 (ujson turns 1e400
    into inf and accepts NaN and 20-digit integers, none of which Ollama's Go decoder
    or PostgreSQL's jsonb takes back), and nesting stays within MAX_DEPTH.
    """
    try:
        _check(value, 1)
    except _Invalid as e:
        path = where
        for step in reversed(e.path):
            path = f"{path}[{step}]" if isinstance(step, int) else field_path(path, step)
        if len(path) > 200:  # 64 levels of long keys: the start says where, the problem what
            path = path[:200] + "…"
        raise ClientError(422, f"{path or 'the body'} {e.problem}") from None


class _Invalid(Exception):
    """A bad value; the path to it is collected on the way out, so a valid body
    (the common case) costs no path strings."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[int | str] = []


def _check(value: Any, depth: int) -> None:
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise _Invalid(problem)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise _Invalid("is an integer outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("is NaN or Infinity (or a number too large, like 1e400), "
                           "which JSON does not allow")
    elif isinstance(value, list):
        _check_depth(depth)
        for i, item in enumerate(value):
            try:
                _check(item, depth + 1)
            except _Invalid as e:
                e.path.append(i)
                raise
    elif isinstance(value, dict):
        _check_depth(depth)
        for key, item in value.items():
            problem = text_problem(key)
            if problem:
                raise _Invalid(f"has a key {_key_repr(key)} that {problem}")
            try:
                _check(item, depth + 1)
            except _Invalid as e:
                e.path.append(key)
                raise
    else:  # never produced by a JSON decoder
        raise _Invalid("is not a JSON value")


def _check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Invalid(f"is nested more than {MAX_DEPTH} levels deep")


def field_path(where: str, key: str) -> str:
    """`where.key`, or `where["key"]` when the key is not a plain name: ASCII-escaped and
    shortened, so an error message naming it can always be encoded and stays short."""
    if _NAME.fullmatch(key):
        return f"{where}.{key}" if where else key
    return f"{where}[{_key_repr(key)}]"


def _key_repr(key: str) -> str:
    shown = json.dumps(key[:40])  # ensure_ascii: NUL and lone surrogates come out as \uXXXX
    return shown + "…" if len(key) > 40 else shown

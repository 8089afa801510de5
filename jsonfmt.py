"""The one place JSON is encoded and decoded, so every response is standard JSON.

ujson's defaults are not: it escapes "/" as "\\/" and writes NaN/Infinity, which
browsers' JSON.parse rejects.  Encoding through here fixes both.
"""

from typing import Any

import ujson

JSONDecodeError = ujson.JSONDecodeError
loads = ujson.loads


def dumps(obj: Any) -> str:
    """Encode *obj* as compact standard JSON (UTF-8 text, "/" unescaped, no NaN)."""
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)


def dumpb(obj: Any) -> bytes:
    return dumps(obj).encode("utf-8")


def canonical(obj: Any) -> str:
    """*obj* as JSON with every object's keys sorted: equal for equal JSON values only (so
    True and 1, or 1 and 1.0, differ, as they do on the wire), whatever the key order."""
    return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False,
                       sort_keys=True)


# -- one JSON text per line, whatever the upstream sent ----------------------------------
#
# Line-based framings (SSE, NDJSON) trust that a JSON line holds no line break.  Standard
# JSON escapes every control character inside strings, but an upstream may still send them
# raw: SSE ends a line at a lone CR, JavaScript (and Python's str.splitlines) also at
# U+2028/U+2029, and a raw control character is invalid JSON for strict parsers.

_CONTROL = bytes(range(0x20)).replace(b"\n", b"")  # LF is the line separator itself
_LS, _PS = "\u2028".encode(), "\u2029".encode()


# Every byte of the above, and the last bytes of U+2028/U+2029 (also the last byte of
# many other characters, e.g. "é", so a hit here is only a reason to look closer).
_SUSPECT = _CONTROL + b"\xa8\xa9"


def dumpb_line(obj: Any) -> bytes:
    """*obj* as one JSON line that no line-based framing can split (see one_line)."""
    out = dumpb(obj)
    if _LS in out or _PS in out:  # ujson leaves these raw; they end a line for JavaScript
        out = out.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
    return out


def has_breakers(data: bytes) -> bool:
    """True if *data* holds a raw control character other than LF, or U+2028/U+2029.

    Cheap enough to run on every upstream chunk: usually one C-level pass (a
    substring search for the 3-byte sequences costs more, so it runs only when a
    byte that could end one is there).
    """
    if len(data.translate(None, _SUSPECT)) == len(data):
        return False
    return len(data.translate(None, _CONTROL)) != len(data) or _LS in data or _PS in data


def one_line(line: bytes) -> bytes:
    """*line* (one NDJSON line, without its LF) made safe for any line-based framing.

    A line without control characters or U+2028/U+2029 comes back unchanged.  Otherwise it
    is decoded and encoded again, which escapes every control character and U+2028/U+2029
    inside strings and drops them as whitespace between tokens (CR and tab are legal JSON
    whitespace there).  A line that does not decode (not JSON, or a raw NUL, which ujson
    refuses) gets each such byte sequence replaced by its JSON \\u escape in place: the
    right escape inside a string, and a line that was not valid JSON stays invalid, but it
    can no longer end a line early.
    """
    if not has_breakers(line):
        return line
    try:
        text = dumps(loads(line))
    except (ValueError, TypeError, OverflowError):
        out = line.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
        for byte in _CONTROL:
            if byte in out:
                out = out.replace(bytes((byte,)), b"\\u%04x" % byte)
        return out
    # ujson escapes control characters but not these two; outside strings JSON is ASCII,
    # so every occurrence is inside a string, where the escape means the same character.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode("utf-8")

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

"""A logging filter that keeps credentials out of every log line, whoever writes it.

chatterd's own lines never quote a credential; this is for the lines it does not write:
Tornado refuses a malformed header with "Invalid header value '<the value>'" (an
Authorization or Cookie value with a stray control character would be logged whole), and a
traceback can quote whatever an exception carried.
"""

import logging
import re

from accounts.credentials import TOKEN_PREFIX
from accounts.policy import SESSION_COOKIE

_PATTERNS = (
    # Tornado's message for a header value it refuses: which header it was is not said, so
    # the value is never shown.
    (re.compile(r"(Invalid header value) .*", re.S), r"\1 (not logged: it may be a credential)"),
    # A token (not the "chd_..." of a help text), a session cookie, a headers dict's repr.
    (re.compile(re.escape(TOKEN_PREFIX) + r"[^\s'\";,.]{8,}"), TOKEN_PREFIX + "[redacted]"),
    (re.compile(re.escape(SESSION_COOKIE) + r"=[^\s'\";,]*"), SESSION_COOKIE + "=[redacted]"),
    (re.compile(r"(['\"](?:Authorization|Cookie)['\"]\s*:\s*['\"])[^'\"]*", re.I), r"\1[redacted]"),
)
# A line holds nothing to redact unless it holds one of these (checked first: the access log
# passes through here once per request).
_MARKS = ("Invalid header value", TOKEN_PREFIX, SESSION_COOKIE.split("-", 1)[1], "uthorization", "ookie")


def redact(text: str) -> str:
    if not any(mark in text for mark in _MARKS):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactCredentials(logging.Filter):
    """Install on the handlers (`handler.addFilter(RedactCredentials())`): a handler's filter
    sees the records of every logger that propagates to it."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self._formatter.formatException(record.exc_info))
        return True


def install(logger: logging.Logger = logging.getLogger()) -> None:
    for handler in logger.handlers:
        handler.addFilter(RedactCredentials())

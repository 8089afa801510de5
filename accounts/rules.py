"""What makes a username and a password acceptable, and the form names are compared in.

Usernames: 1 to 64 characters after NFC normalisation, each a letter, a digit, a combining
mark, or one of ``. _ - @``; no spaces, no punctuation that reads as syntax, no control or
invisible characters.  Names are unique regardless of case: the account is found by the NFC
form of the case-folded name (``username_key``), so "Ada", "ADA" and "ada" are one account,
and "straße" is "STRASSE".  The name is shown as it was chosen.

Passwords: 8 to 1024 characters of any Unicode text after NFC normalisation (so a password
typed with a composed "é" on one keyboard and a decomposed one on another is the same
password); NUL and lone surrogates are refused, as nothing else stores them either.
"""

import unicodedata
from typing import Optional

USERNAME_MAX = 64
PASSWORD_MIN = 8
PASSWORD_MAX = 1024
_NAME_PUNCTUATION = frozenset("._-@")


class RuleError(ValueError):
    """A name or password breaks a rule; the message says which (never quoting a password)."""


def _nfc(text: str) -> str:
    if "\x00" in text:
        raise RuleError("contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RuleError("is not valid Unicode (lone surrogate)") from None
    return unicodedata.normalize("NFC", text)


def username(value: object) -> str:
    """The username as stored and shown (NFC), or RuleError saying which rule it breaks."""
    if not isinstance(value, str):
        raise RuleError("username must be a string")
    try:
        name = _nfc(value)
    except RuleError as e:
        raise RuleError(f"username {e}") from None
    if not name:
        raise RuleError("username must not be empty")
    if len(name) > USERNAME_MAX:
        raise RuleError(f"username is longer than {USERNAME_MAX} characters")
    for ch in name:
        if ch in _NAME_PUNCTUATION:
            continue
        if unicodedata.category(ch)[0] not in "LNM":
            raise RuleError("username may hold only letters, digits and . _ - @ "
                            f"(not {_describe(ch)})")
    return name


def username_key(name: str) -> str:
    """What usernames are compared by: NFC of the case-folded NFC name."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def login_key(value: object) -> Optional[str]:
    """The key a login attempt names, or None if *value* could be no one's username."""
    try:
        return username_key(username(value))
    except RuleError:
        return None


def password(value: object, field: str = "password") -> str:
    """The password as hashed (NFC), or RuleError saying which rule it breaks."""
    if not isinstance(value, str):
        raise RuleError(f"{field} must be a string")
    try:
        text = _nfc(value)
    except RuleError as e:
        raise RuleError(f"{field} {e}") from None
    if len(text) < PASSWORD_MIN:
        raise RuleError(f"{field} must be at least {PASSWORD_MIN} characters long")
    if len(text) > PASSWORD_MAX:
        raise RuleError(f"{field} must be at most {PASSWORD_MAX} characters long")
    return text


def _describe(ch: str) -> str:
    if ch.isprintable() and not ch.isspace():
        return repr(ch)
    return f"U+{ord(ch):04X}"

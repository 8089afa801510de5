"""Opaque credentials: login session ids and API tokens, and the digests they are stored as.

Both are random strings the server makes and hands out once; the database keeps only
credential_hash() of them, so a copy of the database holds nothing a client could present.
"""

import hashlib
import re
import secrets
from typing import Union

TOKEN_PREFIX = "chd_"
SESSION_ID_BYTES = 32  # 256 random bits (at least 128 are needed)
TOKEN_BYTES = 32  # 256 random bits (at least 160 are needed)

# token_urlsafe(n) is the unpadded urlsafe base64 of n random bytes.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{%d}" % -(-SESSION_ID_BYTES * 4 // 3))
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{%d}" % -(-TOKEN_BYTES * 4 // 3))


def new_session_id() -> str:
    """A new login session id: 256 random bits, urlsafe base64 (fits a cookie as is)."""
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def new_api_token() -> str:
    """A new API token: "chd_" and 256 random bits in urlsafe base64.  The prefix tells a
    chatterd token from other bearer values (and lets secret scanners spot a leaked one)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def credential_hash(secret: Union[str, bytes]) -> bytes:
    """The 32-byte SHA-256 digest a session id or API token is stored and looked up by.

    A fast unsalted hash is right here, unlike for passwords: these secrets are 256 random bits,
    so nobody can guess one however many guesses per second a hash allows, and a salt or a slow
    hash would only cost CPU on every request.  Being deterministic, the digest can be the
    indexed key the credential is found by, so the lookup compares digests and never the secret.
    """
    data = secret if isinstance(secret, bytes) else secret.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).digest()


def looks_like_token(value: object) -> bool:
    """Whether value has the form of an API token new_api_token() makes (not whether it is valid)."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def looks_like_session_id(value: object) -> bool:
    """Whether value has the form of a session id new_session_id() makes (not whether it is valid)."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None

"""Reading a request's credentials and origin from its headers (no I/O).

Only two things are chatterd credentials: the session cookie and an `Authorization: Bearer
chd_...` token.  Any other Authorization value (the OpenAI SDKs' dummy `sk-none`, Basic
credentials meant for a proxy) belongs to someone else and is ignored.
"""

from typing import Optional
from urllib.parse import urlsplit

from accounts.credentials import TOKEN_PREFIX

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # "none": typed, bookmarked, not a page's


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The chd_ token an Authorization header carries ("" for a chd_ value in some other
    scheme, which is refused rather than ignored), or None if it carries none."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if not value.startswith(TOKEN_PREFIX) and not scheme.startswith(TOKEN_PREFIX):
        return None
    if scheme.lower() != "bearer" or not value.startswith(TOKEN_PREFIX):
        return ""
    return value


def _origin_key(scheme: str, host: str) -> Optional[str]:
    """scheme://host[:port] in lower case, without the scheme's default port."""
    scheme, host = scheme.lower(), host.lower()
    if not scheme or not host:
        return None
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme}://{host}"


def origin_matches(origin: str, scheme: str, host: str) -> bool:
    """Whether an Origin header names this request's own origin (scheme://Host)."""
    try:
        parts = urlsplit(origin.strip())
        if parts.path or parts.query or parts.fragment or parts.username or parts.password:
            return False
        theirs = _origin_key(parts.scheme, parts.netloc)
    except ValueError:
        return False
    ours = _origin_key(scheme, host)
    return theirs is not None and theirs == ours


def cross_site(fetch_site: Optional[str], origin: Optional[str], scheme: str, host: str) -> Optional[bool]:
    """True if a browser says the request comes from another site (Sec-Fetch-Site, else an
    Origin that is not this request's own), False if it says it is same-origin, None if
    the request carries neither header (no browser's evidence either way)."""
    if fetch_site is not None:
        return fetch_site.strip().lower() not in SAME_ORIGIN_FETCH
    if origin is not None:
        return not origin_matches(origin, scheme, host)
    return None

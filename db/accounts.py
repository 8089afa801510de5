"""SQL for people: users, login sessions, API tokens and the login throttle
(tables: db/migrations/0020_accounts.sql).

Every function takes the pool (`await find_login(pool, key)`) and holds a connection only
for its own statements.  The database latency metric knows them as two operations:
`credential_lookup` (a session's or token's user, on every request that carries one) and
`accounts` (everything else: rare, and each a series of its own would only swell /metrics).  Sessions and tokens are found by the SHA-256 digest of the secret
(accounts/credentials.credential_hash), never by the secret itself; times are PostgreSQL's
now(), so every chatterd process judges expiry by one clock.
"""

import datetime
from typing import NamedTuple, Optional

import asyncpg

from db import conversation_records
from db.pool import connection


class User(NamedTuple):
    """The person a request acts for (handlers' current_user)."""

    id: int
    username: str
    created_at: datetime.datetime


class LoginRecord(NamedTuple):
    id: int
    username: str
    password_hash: str


def _user(row: Optional[asyncpg.Record]) -> Optional[User]:
    return None if row is None else User(row["id"], row["username"], row["created_at"])


# -- users ------------------------------------------------------------------------------

async def username_taken(pool: asyncpg.Pool, key: str) -> bool:
    """Whether an account has this username_key.  `await username_taken(pool, key)`."""
    async with connection(pool, "accounts") as con:
        return bool(await con.fetchval("SELECT 1 FROM users WHERE username_key = $1", key))


async def create_user(pool: asyncpg.Pool, username: str, key: str,
                      password_hash: str) -> Optional[User]:
    """The new user, or None if the name (its key) is taken.
    `await create_user(pool, name, rules.username_key(name), await hasher.hash(password))`."""
    async with connection(pool, "accounts") as con:
        return _user(await con.fetchrow(
            "INSERT INTO users (username, username_key, password_hash) VALUES ($1, $2, $3)"
            " ON CONFLICT (username_key) DO NOTHING RETURNING id, username, created_at",
            username, key, password_hash))


async def find_login(pool: asyncpg.Pool, key: str) -> Optional[LoginRecord]:
    """The user with this username_key and their password hash, or None."""
    async with connection(pool, "accounts") as con:
        row = await con.fetchrow(
            "SELECT id, username, password_hash FROM users WHERE username_key = $1", key)
    return None if row is None else LoginRecord(row["id"], row["username"], row["password_hash"])


async def password_hash(pool: asyncpg.Pool, user_id: int) -> Optional[str]:
    """The user's stored password hash (None if the user is gone)."""
    async with connection(pool, "accounts") as con:
        return await con.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)


async def rehash(pool: asyncpg.Pool, user_id: int, old_hash: str, new_hash: str) -> None:
    """Store new_hash (the same password at grown parameters) unless the password changed
    meanwhile.  `await rehash(pool, user.id, stored, new_hash)` after a matching verify."""
    async with connection(pool, "accounts") as con:
        await con.execute("UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2",
                          user_id, old_hash, new_hash)


async def change_password(pool: asyncpg.Pool, user_id: int, old_hash: str, new_hash: str,
                          keep_session: Optional[bytes]) -> bool:
    """Replace the password and end every session of the user but *keep_session* (the
    id_hash of the session that asked, or None); API tokens stay.  False (and nothing
    changed) if the stored hash is no longer *old_hash*: the password changed meanwhile."""
    async with connection(pool, "accounts") as con:
        async with con.transaction():
            changed = await con.fetchval(
                "UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2"
                " RETURNING true", user_id, old_hash, new_hash)
            if not changed:
                return False
            await con.execute("DELETE FROM sessions WHERE user_id = $1 AND id_hash IS DISTINCT FROM $2",
                              user_id, keep_session)
    return True


async def delete_owned_conversations(con: asyncpg.Connection, owner_id: int) -> None:
    """Delete every conversation (and what hangs off it) that *owner_id* owns, on *con*,
    inside delete_user's transaction."""
    await conversation_records.delete_owner_on(con, owner_id)


async def delete_user(pool: asyncpg.Pool, user_id: int) -> bool:
    """Delete the user with their conversations (delete_owned_conversations), sessions and
    tokens (ON DELETE CASCADE); their board posts stay, unattributed.  False if already gone."""
    async with connection(pool, "accounts") as con:
        async with con.transaction():
            await delete_owned_conversations(con, user_id)
            return bool(await con.fetchval("DELETE FROM users WHERE id = $1 RETURNING true", user_id))


# -- sessions ---------------------------------------------------------------------------

MAX_SESSIONS = 100  # per user: a login beyond them ends the oldest
MAX_TOKENS = 100  # live (not revoked) API tokens per user


async def create_session(pool: asyncpg.Pool, user_id: int, id_hash: bytes, absolute_seconds: float,
                         idle_seconds: float, replaces: Optional[bytes] = None) -> None:
    """Store a new session (id_hash of a fresh credentials.new_session_id()) that ends
    *absolute_seconds* from now at the latest.  The session the request came with
    (*replaces*, its id_hash) ends, as do the user's expired ones."""
    async with connection(pool, "accounts") as con:
        async with con.transaction():
            await con.execute(
                "DELETE FROM sessions WHERE (user_id = $1 AND (expires_at <= now()"
                "  OR last_seen_at <= now() - make_interval(secs => $2)))"
                " OR id_hash = $3", user_id, idle_seconds, replaces)
            await con.execute(
                "INSERT INTO sessions (id_hash, user_id, expires_at)"
                " VALUES ($1, $2, now() + make_interval(secs => $3))", id_hash, user_id,
                absolute_seconds)
            await con.execute(
                "DELETE FROM sessions WHERE id_hash IN (SELECT id_hash FROM sessions WHERE user_id = $1"
                " ORDER BY created_at DESC, id_hash OFFSET $2)", user_id, MAX_SESSIONS)


async def session_user(pool: asyncpg.Pool, id_hash: bytes, idle_seconds: float,
                       touch_after: float) -> Optional[User]:
    """The user of a live session, or None (unknown, ended, idle or past its absolute
    expiry).  The session's last_seen_at moves to now when older than *touch_after*
    seconds: one round trip, and a write only now and then."""
    async with connection(pool, "credential_lookup") as con:
        return _user(await con.fetchrow(
            "WITH s AS ("
            "  SELECT user_id FROM sessions WHERE id_hash = $1 AND expires_at > now()"
            "     AND last_seen_at > now() - make_interval(secs => $2)),"
            " touched AS ("
            "  UPDATE sessions SET last_seen_at = now() WHERE id_hash = $1"
            "     AND last_seen_at <= now() - make_interval(secs => $3) AND EXISTS (SELECT FROM s))"
            " SELECT u.id, u.username, u.created_at FROM s JOIN users u ON u.id = s.user_id",
            id_hash, idle_seconds, touch_after))


async def end_session(pool: asyncpg.Pool, id_hash: bytes) -> None:
    """Delete the session (logout): its cookie is refused from now on."""
    async with connection(pool, "accounts") as con:
        await con.execute("DELETE FROM sessions WHERE id_hash = $1", id_hash)


# -- API tokens -------------------------------------------------------------------------

class TokenInfo(NamedTuple):
    id: int
    name: str
    created_at: datetime.datetime
    last_used_at: Optional[datetime.datetime]
    expires_at: Optional[datetime.datetime]


def _token(row: asyncpg.Record) -> TokenInfo:
    return TokenInfo(row["id"], row["name"], row["created_at"], row["last_used_at"], row["expires_at"])


async def create_token(pool: asyncpg.Pool, user_id: int, name: str, token_hash: bytes,
                       expires_seconds: Optional[float]) -> Optional[TokenInfo]:
    """Store an API token (token_hash of a fresh credentials.new_api_token()), valid until
    revoked or, with *expires_seconds*, until then; None if the user has MAX_TOKENS live
    ones already."""
    async with connection(pool, "accounts") as con:
        async with con.transaction():
            # The user's row locked: two concurrent creations cannot both pass the count.
            await con.execute("SELECT FROM users WHERE id = $1 FOR UPDATE", user_id)
            row = await con.fetchrow(
                "INSERT INTO api_tokens (user_id, name, token_hash, expires_at)"
                " SELECT $1, $2, $3, now() + make_interval(secs => $4)"
                " WHERE (SELECT count(*) FROM api_tokens WHERE user_id = $1 AND revoked_at IS NULL) < $5"
                " RETURNING id, name, created_at, last_used_at, expires_at",
                user_id, name, token_hash, expires_seconds, MAX_TOKENS)
    return None if row is None else _token(row)


async def token_user(pool: asyncpg.Pool, token_hash: bytes, touch_after: float) -> Optional[User]:
    """The user of a live token, or None (unknown, revoked or expired); last_used_at moves to
    now when older than *touch_after* seconds."""
    async with connection(pool, "credential_lookup") as con:
        return _user(await con.fetchrow(
            "WITH t AS ("
            "  SELECT id, user_id, last_used_at FROM api_tokens WHERE token_hash = $1"
            "     AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())),"
            " touched AS ("
            "  UPDATE api_tokens SET last_used_at = now() WHERE id = (SELECT id FROM t)"
            "     AND (last_used_at IS NULL OR last_used_at <= now() - make_interval(secs => $2)))"
            " SELECT u.id, u.username, u.created_at FROM t JOIN users u ON u.id = t.user_id",
            token_hash, touch_after))


async def list_tokens(pool: asyncpg.Pool, user_id: int) -> list[TokenInfo]:
    """The user's tokens not revoked, oldest first (expired ones too, marked by expires_at)."""
    async with connection(pool, "accounts") as con:
        rows = await con.fetch(
            "SELECT id, name, created_at, last_used_at, expires_at FROM api_tokens"
            " WHERE user_id = $1 AND revoked_at IS NULL ORDER BY id", user_id)
    return [_token(r) for r in rows]


async def revoke_token(pool: asyncpg.Pool, user_id: int, token_id: int) -> bool:
    """Revoke the user's token *token_id*; False if the user has no such live token."""
    async with connection(pool, "accounts") as con:
        return bool(await con.fetchval(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = $2 AND user_id = $1"
            " AND revoked_at IS NULL RETURNING true", user_id, token_id))


# -- login throttle ---------------------------------------------------------------------

async def count_login_attempt(pool: asyncpg.Pool, key: str, address: str, window: float,
                              limit: int) -> float:
    """Count an attempt to log in as *key* from *address*; 0 if it may go ahead, else the
    seconds until the pair's window ends (more than *limit* attempts within *window*
    seconds).  Counted before the password is checked, so concurrent guesses count too."""
    async with connection(pool, "accounts") as con:
        row = await con.fetchrow(
            "INSERT INTO login_throttle AS t (username_key, address, attempts, window_start)"
            " VALUES ($1, $2, 1, now())"
            " ON CONFLICT (username_key, address) DO UPDATE SET"
            "  attempts = CASE WHEN t.window_start <= now() - make_interval(secs => $3)"
            "                  THEN 1 ELSE t.attempts + 1 END,"
            "  window_start = CASE WHEN t.window_start <= now() - make_interval(secs => $3)"
            "                      THEN now() ELSE t.window_start END"
            " RETURNING attempts,"
            "  extract(epoch FROM window_start + make_interval(secs => $3) - now())::float8 AS left",
            key, address, window)
    return max(row["left"], 0.001) if row["attempts"] > limit else 0.0


async def clear_login_attempts(pool: asyncpg.Pool, key: str, address: str) -> None:
    """A login succeeded: the pair starts afresh."""
    async with connection(pool, "accounts") as con:
        await con.execute("DELETE FROM login_throttle WHERE username_key = $1 AND address = $2",
                          key, address)


async def prune_login_attempts(pool: asyncpg.Pool, window: float) -> None:
    """Delete the pairs whose window has ended (they would start afresh anyway)."""
    async with connection(pool, "accounts") as con:
        await con.execute("DELETE FROM login_throttle WHERE window_start <= now() - make_interval(secs => $1)",
                          window)

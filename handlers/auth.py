"""People: /auth/signup, /auth/login, /auth/logout, /auth/me, /auth/password, /auth/tokens.

Passwords are checked and hashed by the worker processes of accounts/passwords.py (never on
the event loop); sessions and tokens are random strings stored as their SHA-256 digest
(accounts/credentials.py).  Nothing here logs or echoes a password, token or session id.
"""

import itertools
import logging
from typing import Any, Optional

from accounts import rules
from accounts.credentials import credential_hash, new_api_token, new_session_id
from accounts.passwords import HasherBusy, HasherError, InvalidStoredHash
from db import accounts
from handlers.base import NO_CREDENTIALS, BaseHandler, JSONBodyHandler
from handlers.validation import ClientError, valid_text

log = logging.getLogger("chatterd.auth")

WRONG_LOGIN = "wrong username or password"
TOKEN_NAME_MAX = 100
MAX_TOKEN_DAYS = 3650
PRUNE_EVERY = 256  # login attempts counted between two prunings of the throttle table
_attempts = itertools.count(1)
# A stand-in checked when the request's password cannot be anyone's (too short, NUL, ...),
# so that such a refusal takes a hash's time too.
_NOBODYS_PASSWORD = "not anyone's password"


def iso(value: Any) -> Optional[str]:
    return None if value is None else value.isoformat()


class AuthHandler(JSONBodyHandler):
    """What the account endpoints share: the hasher, the throttle, starting a session."""

    def user(self) -> accounts.User:
        """The logged-in user, or 401."""
        if self.current_user is None:
            raise ClientError(401, "not logged in: log in (POST /auth/login) or send "
                                   "Authorization: Bearer chd_...", NO_CREDENTIALS)
        return self.current_user

    def body_fields(self, *names: str) -> list[Any]:
        body = self.json_object()
        return [body.get(name) for name in names]

    async def hasher_call(self, operation: str, *args: Any) -> Any:
        """hash/verify/dummy_verify on the hasher's workers; 503 when they cannot take it."""
        hasher = self.application.hasher
        if hasher is None:
            raise ClientError(503, "accounts are not available on this server (no password hasher)")
        try:
            return await getattr(hasher, operation)(*args)
        except HasherBusy:
            raise ClientError(503, "too many password checks at once; retry shortly",
                              {"Retry-After": "1"}) from None
        except HasherError:
            log.warning("password hashing failed (%s); answered 503", operation)
            raise ClientError(503, "password hashing is unavailable right now; retry shortly",
                              {"Retry-After": "1"}) from None

    async def password_matches(self, user_id: int, stored: str, password: Optional[str]) -> tuple[bool, Optional[str]]:
        """verify() of *password* (None: one no account can have) against *stored*; a stored
        hash argon2 cannot read matches nothing (and is logged, by user id)."""
        if password is None:
            await self.hasher_call("dummy_verify", _NOBODYS_PASSWORD)
            return False, None
        try:
            return await self.hasher_call("verify", stored, password)
        except InvalidStoredHash:
            log.warning("user %d has a stored password hash that is not an Argon2 PHC string", user_id)
            return False, None

    async def throttle(self, key: str) -> None:
        """Count an attempt at *key*'s password from this address; 429 beyond the limit."""
        policy = self.application.auth
        address = self.request.remote_ip or ""
        if next(_attempts) % PRUNE_EVERY == 0:
            await accounts.prune_login_attempts(self.pool, policy.login_window)
        wait = await accounts.count_login_attempt(self.pool, key, address, policy.login_window,
                                                  policy.login_attempts)
        if wait:
            seconds = str(int(wait) + 1)
            raise ClientError(429, f"too many attempts for this username from this address; "
                                   f"retry in {seconds} s", {"Retry-After": seconds})

    async def start_session(self, user_id: int) -> None:
        """A new session for the user (a new id at every login), in the cookie; the session
        the request came with ends."""
        policy = self.application.auth
        session_id = new_session_id()
        await accounts.create_session(self.pool, user_id, credential_hash(session_id),
                                      policy.session_max_age, policy.session_idle,
                                      replaces=self.session_hash)
        self.set_session_cookie(session_id)

    def no_content(self) -> None:
        self.set_status(204)
        self.finish()


def password_or_none(value: Any) -> Optional[str]:
    """The password as hashed if it could be anyone's, else None (checked as nobody's)."""
    try:
        return rules.password(value)
    except rules.RuleError:
        return None


def strings(*values: Any) -> None:
    if not all(isinstance(v, str) for v in values):
        raise ClientError(422, "username and password are required and must be strings")


class SignupHandler(AuthHandler):
    public = True
    sets_session = replaces_session = True

    async def post(self) -> None:
        if not self.application.auth.signup_open:
            raise ClientError(403, "signup is closed on this server: ask its administrator "
                                   "for an account")
        name, password = self.body_fields("username", "password")
        try:
            name = rules.username(name)
            password = rules.password(password)
        except rules.RuleError as e:
            raise ClientError(422, str(e)) from None
        key = rules.username_key(name)
        if await accounts.username_taken(self.pool, key):
            raise ClientError(409, "this username is taken")
        user = await accounts.create_user(self.pool, name, key, await self.hasher_call("hash", password))
        if user is None:  # taken while we hashed
            raise ClientError(409, "this username is taken")
        await self.start_session(user.id)
        self.send_json({"username": user.username}, 201)


class LoginHandler(AuthHandler):
    public = True
    sets_session = replaces_session = True

    async def post(self) -> None:
        name, password = self.body_fields("username", "password")
        strings(name, password)
        key = rules.login_key(name)
        # Names no account can have share one bucket per address (they are not storable keys).
        await self.throttle(key or "")
        password = password_or_none(password)
        record = await accounts.find_login(self.pool, key) if key else None
        if record is None:
            # An unknown user costs a hash too: the answer and its time are a wrong password's.
            await self.hasher_call("dummy_verify", password or _NOBODYS_PASSWORD)
            raise ClientError(401, WRONG_LOGIN, NO_CREDENTIALS)
        ok, new_hash = await self.password_matches(record.id, record.password_hash, password)
        if not ok:
            raise ClientError(401, WRONG_LOGIN, NO_CREDENTIALS)
        if new_hash is not None:  # this server hashes with stronger parameters than that hash
            await accounts.rehash(self.pool, record.id, record.password_hash, new_hash)
        await accounts.clear_login_attempts(self.pool, key, self.request.remote_ip or "")  # type: ignore[arg-type]
        await self.start_session(record.id)
        self.send_json({"username": record.username})


class LogoutHandler(BaseHandler):
    replaces_session = True

    async def post(self) -> None:
        if self.credential == "session":
            await accounts.end_session(self.pool, self.session_hash)  # type: ignore[arg-type]
        self.clear_session_cookie()
        self.set_status(204)
        self.finish()


class ProvenUser(AuthHandler):
    """Endpoints that want the user's current password in the body (throttled as a login)."""

    async def prove(self, password: Any) -> tuple[accounts.User, str]:
        """(the user, their stored hash) once *password* is theirs; else 403."""
        user = self.user()
        if not isinstance(password, str):
            raise ClientError(422, "password (the current one) is required and must be a string")
        await self.throttle(rules.username_key(user.username))
        stored = await accounts.password_hash(self.pool, user.id)
        if stored is None:
            raise ClientError(401, "this account no longer exists", NO_CREDENTIALS)
        ok, _ = await self.password_matches(user.id, stored, password_or_none(password))
        if not ok:
            raise ClientError(403, "wrong password")
        await accounts.clear_login_attempts(self.pool, rules.username_key(user.username),
                                            self.request.remote_ip or "")
        return user, stored


class MeHandler(ProvenUser):
    def get(self) -> None:
        user = self.user()
        self.send_json({"username": user.username, "created_at": iso(user.created_at)})

    async def delete(self) -> None:
        (password,) = self.body_fields("password")
        user, _ = await self.prove(password)
        await accounts.delete_user(self.pool, user.id)
        self.clear_session_cookie()
        self.no_content()


class PasswordHandler(ProvenUser):
    async def post(self) -> None:
        self.user()
        password, new_password = self.body_fields("password", "new_password")
        try:
            new_password = rules.password(new_password, "new_password")
        except rules.RuleError as e:
            raise ClientError(422, str(e)) from None
        user, stored = await self.prove(password)
        new_hash = await self.hasher_call("hash", new_password)
        # Every session ends, this one too; a session that asked continues in a new one
        # (a new id after a change of credentials).
        if not await accounts.change_password(self.pool, user.id, stored, new_hash, keep_session=None):
            raise ClientError(409, "the password was changed meanwhile; try again")
        if self.credential == "session":
            self.session_hash = None
            await self.start_session(user.id)
        self.no_content()


def token_json(info: accounts.TokenInfo) -> dict:
    return {"id": info.id, "name": info.name, "created_at": iso(info.created_at),
            "last_used_at": iso(info.last_used_at), "expires_at": iso(info.expires_at)}


class TokensHandler(AuthHandler):
    async def get(self) -> None:
        user = self.user()
        self.send_json([token_json(t) for t in await accounts.list_tokens(self.pool, user.id)])

    async def post(self) -> None:
        user = self.user()
        if self.credential != "session":
            # A leaked token must not be able to mint more: tokens come from a login.
            raise ClientError(403, "API tokens are made from a login session, not with a token")
        body = self.json_object()
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ClientError(422, "name is required and must be a non-empty string")
        valid_text(name, "name")
        if len(name) > TOKEN_NAME_MAX:
            raise ClientError(422, f"name is longer than {TOKEN_NAME_MAX} characters")
        days = body.get("expires_in_days")
        if days is not None and (isinstance(days, bool) or not isinstance(days, int)
                                 or not 1 <= days <= MAX_TOKEN_DAYS):
            raise ClientError(422, f"expires_in_days must be a whole number of days from 1 to "
                                   f"{MAX_TOKEN_DAYS} (or absent: until revoked)")
        token = new_api_token()
        info = await accounts.create_token(self.pool, user.id, name, credential_hash(token),
                                           None if days is None else days * 86400.0)
        if info is None:
            raise ClientError(409, f"this account has {accounts.MAX_TOKENS} API tokens already: "
                                   "revoke one first")
        self.send_json({**token_json(info), "token": token}, 201)


class TokenHandler(BaseHandler):
    async def delete(self, token_id: str) -> None:
        user = self.current_user
        if user is None:
            raise ClientError(401, "not logged in", NO_CREDENTIALS)
        if not await accounts.revoke_token(self.pool, user.id, int(token_id)):
            raise ClientError(404, "no such API token")
        self.set_status(204)
        self.finish()

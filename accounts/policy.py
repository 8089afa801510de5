"""The account settings a server runs with (--auth, --signup, --session-*, --login-*)."""

from dataclasses import dataclass

SESSION_COOKIE = "__Host-chatterd_session"


@dataclass(frozen=True)
class AuthPolicy:
    """required: every endpoint but the public ones needs a user (--auth required);
    signup_open: POST /auth/signup makes accounts (--signup open);
    session_idle / session_max_age: seconds a login session lasts unused / at most;
    login_attempts per login_window seconds for one username from one address."""

    required: bool = False
    signup_open: bool = True
    session_idle: float = 86400.0
    session_max_age: float = 604800.0
    login_attempts: int = 5
    login_window: float = 300.0

    @property
    def touch_after(self) -> float:
        """How stale a session's last_seen_at (or a token's last_used_at) may get before a
        request moves it: a write now and then rather than on every request, and always
        well within the idle expiry."""
        return min(60.0, self.session_idle / 4)

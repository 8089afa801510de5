"""What can go wrong with an upstream call, as the exceptions every dialect raises: each
carries the HTTP status a client should see when it happens before the stream starts."""

from typing import Optional


class UpstreamError(Exception):
    """A failed Ollama request; `status` is what a client should see before streaming."""

    status = 502

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class UpstreamUnreachable(UpstreamError):
    status = 502


class UpstreamHTTPError(UpstreamError):
    """Ollama answered with a non-200 status and (usually) {"error": "..."}."""


class UpstreamTimeout(UpstreamError):
    status = 504


class UpstreamBroken(UpstreamError):
    """The connection failed after Ollama had started answering."""


class UpstreamAborted(UpstreamError):
    """We cancelled the request ourselves (the client left, or the turn ended)."""


class UpstreamBusy(UpstreamError):
    """Every upstream slot stayed taken for the whole queue timeout."""

    status = 503

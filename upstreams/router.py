"""Which upstream serves a request, and failing over to the next before the stream starts.

Rules (docs/upstreams.md):
* `--upstreams` lists upstreams in order of preference: Ollama base URLs, or
  OpenAI-compatible ones as `openai+http(s)://[:KEY@]host[:port]/v1`.  The key is sent as
  `Authorization: Bearer` and never logged or shown (names are the URLs without it).
* Which upstream has which model is learned from `/api/tags` and `/v1/models`, every
  --models-refresh seconds and on a miss (at most once per MISS_REFRESH seconds).
* A request goes to the upstreams listing its model, in order.  A model none lists goes to
  the Ollama upstreams in order (Ollama answers its own 404; a 404 moves on to the next
  Ollama); with no Ollama upstream, chatterd answers 404 itself.
* Failover: connection refused, connect timeout, a connection closed before any status, or
  5xx/429 before the stream started: the next candidate is tried, the client sees nothing.
  The failed upstream is tried last for --upstream-cooldown seconds.  Once the status was
  200 the call is that upstream's, so a later failure reaches the client (`event: error`).
* With a single Ollama upstream nothing is parsed or listed: its calls are OllamaCalls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import jsonfmt
import metrics
from settings import Settings
from upstreams.client import LinesCallback, UpstreamClient
from upstreams.errors import UpstreamAborted, UpstreamBroken, UpstreamError, UpstreamHTTPError, UpstreamUnreachable
from upstreams.http import forget_traceback
from upstreams.ollama import OllamaUpstream, model_key
from upstreams.slots import Slots
from upstreams.openai import OpenAIClient, display_url

log = logging.getLogger("chatterd")

MISS_REFRESH = 5.0  # seconds between listings triggered by an unknown model
GENERATION_PATHS = ("/api/chat", "/api/generate")


def from_settings(config: Settings) -> "Router":
    """The Router of --upstreams (or --ollama-url alone)."""
    return Router(parse_upstreams(config), config)


def parse_upstreams(config: Settings) -> list[UpstreamClient]:
    """Clients for a comma-separated --upstreams (or --ollama-url alone), sharing one Slots."""
    urls = [u.strip() for u in config.upstreams.split(",") if u.strip()] or [config.ollama_url]
    slots = Slots(config.max_streams)
    clients: list[UpstreamClient] = []
    for url in urls:
        try:
            if url.startswith("openai+"):
                clients.append(OpenAIClient(url, config, slots=slots))
            else:
                clients.append(OllamaUpstream(url, config, slots=slots))
        except ValueError as e:
            raise ValueError(f"--upstreams: {display_url(url)!r}: {e}") from None
    return clients


class Member:
    """One upstream and what the router knows of it."""

    def __init__(self, index: int, client: UpstreamClient) -> None:
        self.index = index
        self.client = client
        self.dialect: str = client.dialect  # type: ignore[attr-defined]
        self.name: str = client.name  # type: ignore[attr-defined]
        self.label = f"{index}:{self.name}"  # the metric label: no credentials in it
        self.models: set[str] = set()
        self.listed_at: Optional[float] = None
        self.list_error: Optional[str] = None
        self.unhealthy_until = 0.0
        self.last_error: Optional[str] = None
        self.requests = 0  # also in /metrics; kept here for /readyz
        self.failures = 0

    def has(self, model: str) -> bool:
        if self.dialect == "ollama":
            return model_key(model) in self.models
        return model in self.models or model.lower() in self.models

    def remember(self, names: list[str]) -> None:
        if self.dialect == "ollama":
            self.models = {model_key(n) for n in names}
        else:
            self.models = set(names) | {n.lower() for n in names}

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.unhealthy_until


class Router:
    """The upstreams in order; `post()` returns a call that fails over transparently."""

    def __init__(self, clients: list[UpstreamClient], config: Settings) -> None:
        if not clients:
            raise ValueError("no upstream configured")
        self.members = [Member(i, c) for i, c in enumerate(clients)]
        self.cooldown = config.upstream_cooldown
        self.refresh_every = config.models_refresh
        self._refreshing: Optional[asyncio.Future] = None
        self._last_refresh = -1e9
        self._refresher: Optional[asyncio.Task] = None
        for m in self.members:
            metrics.UPSTREAM_HEALTHY.labels(upstream=m.label).set(1)

    # -- what the handlers and ops see ------------------------------------------------------

    @property
    def single_ollama(self) -> bool:
        return len(self.members) == 1 and self.members[0].dialect == "ollama"

    def post(self, path: str, body: Optional[bytes], on_lines: Optional[LinesCallback],
             headers: Optional[dict[str, str]] = None) -> Any:
        """The call of POST *path* (*headers* sent with it, to whichever upstream)."""
        if self.single_ollama:
            member = self.members[0]
            metrics.UPSTREAM_REQUESTS.labels(upstream=member.label).inc()
            member.requests += 1
            return member.client.post(path, body, on_lines, headers)
        self.start()
        return RoutedCall(self, path, body, on_lines, headers)

    async def status(self, timeout: float = 2.0) -> list[dict]:
        """Each upstream's health, for /readyz; also refreshes the model listings."""
        await self.refresh(timeout)
        out = []
        for m in self.members:
            out.append({"upstream": m.label, "dialect": m.dialect, "url": m.name,
                        "ok": m.list_error is None and m.healthy,
                        "requests": m.requests, "failures": m.failures,
                        "models": sorted(m.models) if m.dialect != "ollama" else
                        sorted({n.removesuffix(":latest") for n in m.models}),
                        **({"error": m.list_error or m.last_error}
                           if (m.list_error or not m.healthy) else {})})
        return out

    def models(self) -> list[tuple[str, Member]]:
        seen: dict[str, Member] = {}
        for m in self.members:
            for name in sorted(m.models):
                if m.dialect == "ollama" and name.endswith(":latest"):
                    name = name.removesuffix(":latest")
                seen.setdefault(name, m)
        return list(seen.items())

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for m in self.members:
            m.client.close()

    # -- model listings -------------------------------------------------------------------

    def start(self) -> None:
        """List the models now and every --models-refresh seconds (call on the IOLoop)."""
        if self._refresher is None and not self.single_ollama:
            self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a listing failure must not end the loop
                log.exception("listing the upstreams' models failed")
            await asyncio.sleep(self.refresh_every)

    async def refresh(self, timeout: float = 2.0) -> None:
        """List every upstream's models (one listing at a time for all callers)."""
        if self._refreshing is None or self._refreshing.done():
            self._last_refresh = time.monotonic()
            self._refreshing = asyncio.ensure_future(self._list_all(timeout))
        await asyncio.shield(self._refreshing)

    async def _list_all(self, timeout: float) -> None:
        async def one(m: Member) -> None:
            try:
                m.remember(await m.client.models(timeout))  # type: ignore[attr-defined]
                m.listed_at, m.list_error = time.monotonic(), None
            except (UpstreamError, ValueError, AttributeError, TypeError) as e:
                m.list_error = getattr(e, "message", None) or f"bad model listing: {e}"
        await asyncio.gather(*(one(m) for m in self.members))

    async def candidates(self, model: Optional[str], path: str) -> list[Member]:
        ollamas = [m for m in self.members if m.dialect == "ollama"]
        if path not in GENERATION_PATHS or not model:
            if ollamas:
                return ollamas[:1]
            if path not in GENERATION_PATHS:
                raise UpstreamHTTPError(f"no Ollama upstream for {path}", status=404)
            raise UpstreamHTTPError("model is required", status=400)
        listing = [m for m in self.members if m.has(model)]
        if not listing:
            if self._refreshing is not None and not self._refreshing.done():
                await asyncio.shield(self._refreshing)  # a listing under way: its answer
            elif time.monotonic() - self._last_refresh >= MISS_REFRESH:
                await self.refresh()
            listing = [m for m in self.members if m.has(model)]
        if not listing:
            if not ollamas:
                raise UpstreamHTTPError(f"model '{model}' not found", status=404)
            listing = ollamas
        # Upstreams cooling down after a failure are tried last, not never.
        return [m for m in listing if m.healthy] + [m for m in listing if not m.healthy]

    def failed(self, member: Member, error: str) -> None:
        member.unhealthy_until = time.monotonic() + self.cooldown
        member.last_error = error
        member.failures += 1
        metrics.UPSTREAM_FAILURES.labels(upstream=member.label).inc()
        metrics.UPSTREAM_HEALTHY.labels(upstream=member.label).set(0)

    def succeeded(self, member: Member) -> None:
        if member.unhealthy_until:
            member.unhealthy_until = 0.0
            metrics.UPSTREAM_HEALTHY.labels(upstream=member.label).set(1)


def retryable(status: Optional[int], error: Optional[UpstreamError]) -> bool:
    """May this attempt's failure go to the next upstream?  Only before any answer."""
    if status is None:
        return isinstance(error, UpstreamUnreachable) or (
            isinstance(error, UpstreamBroken) and "without answering" in error.message)
    return status == 429 or 500 <= status < 600


class RoutedCall:
    """UpstreamCall's interface over a sequence of attempts, one upstream each."""

    def __init__(self, router: Router, path: str, body: Optional[bytes],
                 on_lines: Optional[LinesCallback], headers: Optional[dict[str, str]] = None) -> None:
        self.router = router
        self.path = path
        self.request_body = body
        self.on_lines = on_lines
        self.headers = headers
        self.attempt: Any = None
        self.member: Optional[Member] = None
        self.error: Optional[UpstreamError] = None  # the router's own answer (404, ...)
        self._abort_error: Optional[UpstreamError] = None
        self._settled = False  # the final attempt's finished() was already awaited
        self._settled_error: Optional[UpstreamError] = None
        loop = asyncio.get_running_loop()
        self._slot: asyncio.Future = loop.create_future()
        self._run = asyncio.ensure_future(self._choose())

    # -- UpstreamCall's interface -------------------------------------------------------------

    def release(self) -> None:
        """As UpstreamCall.release: the owner is done with this call."""
        self.on_lines = None
        if self.attempt is not None:
            self.attempt.release()
        errors = [self.error, self._abort_error, self._settled_error]
        if self._run.done() and not self._run.cancelled():
            errors.append(self._run.exception())
        for error in errors:
            forget_traceback(error)

    @property
    def status(self) -> Optional[int]:
        if self.attempt is None:
            return None
        if self.attempt.status == 200 or self._run.done():
            return self.attempt.status
        return None

    @property
    def reason(self) -> str:
        return self.attempt.reason if self.attempt is not None else ""

    @property
    def body(self) -> bytearray:
        return self.attempt.body if self.attempt is not None else bytearray()

    @property
    def content_type(self) -> str:
        return self.attempt.content_type if self.attempt is not None else "application/json"

    @property
    def failed_early(self) -> bool:
        return self._run.done() and (self.attempt is None or self.attempt.failed_early)

    async def wait_slot(self) -> None:
        if not self._slot.done():
            await asyncio.wait([self._slot, self._run], return_when=asyncio.FIRST_COMPLETED)

    async def wait_status(self, timeout: Optional[float]) -> Optional[int]:
        if self.status is None:
            await asyncio.wait([self._run], timeout=timeout)
        return self.status

    def abort(self, error: UpstreamError) -> None:
        if self._abort_error is None:
            self._abort_error = error
        if self.attempt is not None:
            self.attempt.abort(self._abort_error)

    async def finished(self) -> None:
        await asyncio.shield(self._run)
        if self.attempt is None:
            error = self._abort_error or self.error or UpstreamError("no upstream was tried")
            if not isinstance(error, UpstreamAborted):
                metrics.UPSTREAM_ERRORS.labels(kind=type(error).__name__).inc()
            raise error
        if self._settled:
            if self._settled_error is not None:
                raise self._settled_error
            return
        try:
            await self.attempt.finished()
        except UpstreamAborted:
            raise
        except UpstreamError:
            if self.attempt.status == 200 and self.member is not None:
                self.member.failures += 1
                metrics.UPSTREAM_FAILURES.labels(upstream=self.member.label).inc()
            raise

    # -- choosing ---------------------------------------------------------------------------

    async def _choose(self) -> None:
        parsed: Optional[dict] = None
        model: Optional[str] = None
        try:
            parsed = jsonfmt.loads(self.request_body) if self.request_body else None
            if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                model = parsed["model"]
        except ValueError:
            parsed = None
        try:
            members = await self.router.candidates(model, self.path)
        except UpstreamError as e:
            self.error = e
            return
        fallback = not any(m.has(model) for m in members) if model else True
        for position, member in enumerate(members):
            if self._abort_error is not None:
                return
            last = position == len(members) - 1
            if member.dialect != "ollama" and not isinstance(parsed, dict):
                self.error = UpstreamHTTPError("body is not a JSON object", status=400)
                return
            metrics.UPSTREAM_REQUESTS.labels(upstream=member.label).inc()
            member.requests += 1
            try:
                attempt = member.client.post(self.path, self.request_body, self.on_lines,
                                             self.headers, parsed) if member.dialect != "ollama" \
                    else member.client.post(self.path, self.request_body, self.on_lines, self.headers)
            except (ValueError, TypeError, AttributeError) as e:
                self.error = UpstreamHTTPError(f"cannot translate the request: {e}", status=400)
                return
            self.attempt, self.member = attempt, member
            self._settled, self._settled_error = False, None
            if self._abort_error is not None:
                attempt.abort(self._abort_error)
            await attempt.wait_slot()
            if not self._slot.done():
                self._slot.set_result(None)
            status = await attempt.wait_status(None)
            if status == 200:
                self.router.succeeded(member)
                return
            error: Optional[UpstreamError] = None
            if status is not None or attempt.failed_early:
                try:
                    await attempt.finished()
                except UpstreamError as e:
                    error = e
                self._settled, self._settled_error = True, error
            if self._abort_error is not None or last:
                if error is not None and retryable(status, error):
                    self.router.failed(member, error.message)
                return
            moving_on = retryable(status, error) or (fallback and status == 404)
            if not moving_on:
                return
            if status != 404 and error is not None:
                self.router.failed(member, error.message)
            log.warning("upstream %s failed before answering (%s); trying %s", member.label,
                        error.message if error else status, members[position + 1].label)

"""chatterd: the course's chat back end on Tornado, asyncpg and Ollama.

This module only wires things together: settings, the route list, the database,
the Ollama client, the HTTP server, and a graceful shutdown on SIGTERM/SIGINT.
Run `python chatterd.py --help` for every setting.
"""

import asyncio
from datetime import timedelta
import getpass
from http import HTTPStatus
import logging
import os
import resource
import signal
import sys
from typing import Any

import tornado.locks
import tornado.web
from tornado.httpserver import HTTPServer

import metrics
import settings
import tools
from accounts import redact, rules
from accounts.limits import CallerLimits
from accounts.passwords import HasherError, PasswordHasher
from accounts.policy import AuthPolicy
from db import accounts, course_import
from db.startup import describe_error, open_database
from handlers.auth import (LoginHandler, LogoutHandler, MeHandler, PasswordHandler, SignupHandler,
                           TokenHandler, TokensHandler)
from handlers.base import JSONBodyHandler, NotFoundHandler
from handlers.board import GetChattsHandler, PostChattHandler, TopHandler
from handlers.chat import LLMChatHandler
from handlers.conversations import ConversationHandler, ConversationsHandler
from handlers.limits import BodyTooLargeHandler
from handlers.llm import LLMPrepHandler, LLMPromptHandler
from handlers.llmtools import LLMToolsHandler
from handlers.openai_api import ChatCompletionsHandler, ModelsHandler
from handlers.ops import HealthHandler, MetricsHandler, ReadyHandler
from handlers.resume import TurnEventsHandler, TurnStopHandler
from handlers.web import ChatRedirectHandler, WebPageHandler
from resume import Resumption
from runtime.accept_guard import GuardedHTTPServer
from runtime.gc_schedule import FullCollections
from turns import TurnKeeper
from upstreams import router
from upstreams.router import Router

log = logging.getLogger("chatterd")
access_log = logging.getLogger("chatterd.access")

ROUTES = [
    (r"/", TopHandler),
    (r"/getchatts/?", GetChattsHandler),
    (r"/postchatt/?", PostChattHandler),
    (r"/llmprompt/?", LLMPromptHandler),
    (r"/llmprep/?", LLMPrepHandler),
    (r"/llmchat/?", LLMChatHandler),
    (r"/llmtools/?", LLMToolsHandler),
    (r"/v1/chat/completions/?", ChatCompletionsHandler),
    (r"/v1/models/?", ModelsHandler),
    (r"/turns/([0-9]+)/events/?", TurnEventsHandler),
    (r"/turns/([0-9]+)/stop/?", TurnStopHandler),
    (r"/conversations/?", ConversationsHandler),
    # The appID URL-encoded (a "/" in it as %2F); Tornado decodes it for the handler.
    (r"/conversations/([^/]+)/?", ConversationHandler),
    (r"/healthz/?", HealthHandler),
    (r"/readyz/?", ReadyHandler),
    (r"/metrics/?", MetricsHandler),
    (r"/auth/signup/?", SignupHandler),
    (r"/auth/login/?", LoginHandler),
    (r"/auth/logout/?", LogoutHandler),
    (r"/auth/me/?", MeHandler),
    (r"/auth/password/?", PasswordHandler),
    (r"/auth/tokens/?", TokensHandler),
    (r"/auth/tokens/([0-9]{1,18})/?", TokenHandler),
    (r"/chat", ChatRedirectHandler),
    (r"/chat/(.*)", WebPageHandler),
]


NO_BODY_LIMIT = 4096  # bytes of body accepted (and ignored) by an endpoint that takes none

# Metric labels come from fixed sets, so no client can add series (a random method or
# path per request would otherwise grow /metrics without bound).
ROUTE_NAMES = {handler: pattern.removesuffix("/?") for pattern, handler in ROUTES}
ROUTE_NAMES[ConversationHandler] = "/conversations/{appID}"
ROUTE_NAMES[TokenHandler] = "/auth/tokens/{id}"
METRIC_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})
METRIC_STATUSES = frozenset(int(s) for s in HTTPStatus) | {499}


def metric_labels(handler: tornado.web.RequestHandler) -> dict[str, str]:
    """route: a ROUTES entry or "unmatched"; method: a usual one or "other"; status: a
    known code, else its class ("5xx")."""
    method = handler.request.method or ""
    status = handler.get_status()
    if status not in METRIC_STATUSES:
        status_label = f"{status // 100}xx" if 100 <= status < 600 else "other"
    else:
        status_label = str(status)
    route = getattr(handler, "metric_route", None) or ROUTE_NAMES.get(type(handler), "unmatched")
    return {"route": route,
            "method": method if method in METRIC_METHODS else "other", "status": status_label}


class Application(tornado.web.Application):
    """The routes plus what handlers share: the settings (`config`, read by handlers as
    `self.config`), the pool, the upstreams, the turns, the resident tools, the password
    hasher, the per-caller limits, the live streams."""

    def __init__(self, pool: Any, upstreams: Router, config: settings.Settings,
                 hasher: PasswordHasher | None = None) -> None:
        self.config = config
        self.pool = pool
        self.upstreams = upstreams
        self.auth = auth_policy(config)
        self.hasher = hasher  # None: the account endpoints answer 503
        self.caller_limits = CallerLimits(streams=config.user_streams, rate=config.user_rate)
        self.turns = TurnKeeper(pool, config)
        # Resumable streams (resume/): ids, checkpoints, LISTEN/NOTIFY, stop.
        self.resume = Resumption(pool, config)
        self.turns.on_busy = self.resume.stop_if_detached
        self.tools = tools.resident(config)  # the resident tools of /llmtools
        self.draining = False
        self.in_flight: set = set()  # every request being handled, streams included
        self.request_finished = tornado.locks.Condition()
        super().__init__(ROUTES, default_handler_class=NotFoundHandler, log_function=log_request)

    def get_handler_delegate(self, request: Any, target_class: type, target_kwargs: Any = None,
                             path_args: Any = None, path_kwargs: Any = None) -> Any:
        """Called once a request's headers are in, before its body is read."""
        if not issubclass(target_class, JSONBodyHandler):
            # This endpoint takes no body.  Tornado would read one whole (up to the server's
            # cap) before the handler runs; refuse a large one now instead, unread.
            if hasattr(request.connection, "set_max_body_size"):
                request.connection.set_max_body_size(NO_BODY_LIMIT)  # chunked: 400 past it
            length = request.headers.get("Content-Length", "")
            if length.isascii() and length.isdigit() and len(length) <= 18 \
                    and int(length) > NO_BODY_LIMIT:
                target_kwargs = {"route": ROUTE_NAMES.get(target_class, "unmatched"),
                                 "limit": NO_BODY_LIMIT}
                target_class, path_args, path_kwargs = BodyTooLargeHandler, None, None
        return super().get_handler_delegate(request, target_class, target_kwargs,
                                            path_args, path_kwargs)

    def request_started(self, handler: Any) -> None:
        self.in_flight.add(handler)

    def request_done(self, handler: Any) -> None:
        self.in_flight.discard(handler)
        self.request_finished.notify_all()

    async def drain(self, grace: float) -> None:
        """Refuse new turns, let requests in flight finish for *grace* seconds, then end
        the streams still running (their partial replies are stored)."""
        self.draining = True
        if not await self._all_finished(within=grace):
            log.warning("ending %d request(s) still running after %g s", len(self.in_flight), grace)
            for handler in list(self.in_flight):
                if hasattr(handler, "end_for_shutdown"):
                    handler.end_for_shutdown()
            await self._all_finished(within=10)  # time to store what they have

    async def _all_finished(self, within: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.in_flight and loop.time() < deadline:
            await self.request_finished.wait(timeout=timedelta(seconds=deadline - loop.time()))
        return not self.in_flight


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The one access-log line per request: status, client IP, method, path, duration."""
    request = handler.request
    status = handler.get_status()
    metrics.REQUESTS.labels(**metric_labels(handler)).inc()
    parts = [str(status), request.remote_ip, request.method, request.path,
             f"{1000.0 * request.request_time():.1f}ms"]
    for name in ("app_id", "tokens", "outcome", "context", "error_message"):
        value = getattr(handler, name, None)
        if value is not None:
            parts.append(f"{'appID' if name == 'app_id' else name.replace('_message', '')}={value!r}"
                         if isinstance(value, str) else f"{name}={value}")
    level = logging.INFO if status < 500 else logging.WARNING
    access_log.log(level, " ".join(parts))


def page_url(address: str, port: int) -> str:
    """The chat page's URL for a person on this machine (a wildcard address is loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/chat/"


def raise_open_file_limit() -> None:
    # Every chat holds two sockets; the usual soft limit of 1024 caps us near 500 chats.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_server(app: Application) -> HTTPServer:
    """The HTTP server with chatterd's connection limits (docs/turn-contract.md, "Limits")."""
    config = app.config
    return GuardedHTTPServer(  # at the open-file limit: pauses accepting, no spin, no log flood
        app, xheaders=config.xheaders,
        # The server's own cap sits above ours so oversized bodies get a 413, not a dropped connection.
        max_body_size=max(config.max_body_size * 2, 1 << 26),
        # Tornado uses this one timer both for a kept-alive connection's silence and as the
        # deadline for a request's headers (a slowloris client is cut when it expires).
        idle_connection_timeout=config.idle_connection_timeout,
        body_timeout=config.body_timeout)


async def main(config: settings.Settings, new_password: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The format uses none of these, and finding them costs every log line (one per request):
    # the logging HOWTO's "Optimization" section.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    redact.install()  # no credential in any line, Tornado's and tracebacks included
    raise_open_file_limit()
    if config.add_user:
        await add_user(config, new_password or "")
        return
    pool = await open_database(config, import_course=not config.import_course,
                               ready=not config.import_course)
    if config.import_course:
        try:
            await course_import.import_now(pool)
        except Exception as e:
            pool.terminate()
            if isinstance(e, course_import.NoCourseTable):
                raise SystemExit(f"chatterd: {e}") from None
            raise SystemExit(f"chatterd: the course import failed: {describe_error(e)}") from None
        await asyncio.wait_for(pool.close(), 10)
        return
    try:
        upstreams = router.from_settings(config)
    except ValueError as e:
        pool.terminate()
        raise SystemExit(f"chatterd: {e} (see --help)") from None
    hasher = PasswordHasher(workers=config.hash_workers)
    try:
        await hasher.start()
    except HasherError as e:
        pool.terminate()
        raise SystemExit(f"chatterd: {e}") from None
    upstreams.start()
    app = Application(pool, upstreams, config, hasher)
    server = make_server(app)
    try:
        server.listen(config.port, config.address)
    except OSError as e:
        await hasher.close()
        pool.terminate()
        raise SystemExit(f"chatterd: cannot listen on {config.address}:{config.port}: "
                         f"{describe_error(e)}") from None
    log.info("chatterd listening on http://%s:%d (upstreams: %s)", config.address, config.port,
             ", ".join(m.name for m in upstreams.members))
    log.info("the chat page: %s", page_url(config.address, config.port))

    full_collections = FullCollections(config.gc_full_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new connections; %d request(s) in flight", len(app.in_flight))
    server.stop()
    await app.drain(config.shutdown_grace)
    await asyncio.wait_for(server.close_all_connections(), 10)
    await hasher.close()
    upstreams.close()
    await app.turns.flush_delivered()
    app.turns.close()
    await app.resume.close()
    await asyncio.wait_for(pool.close(), 10)
    full_collections.stop()
    log.info("stopped")


def auth_policy(config: settings.Settings) -> AuthPolicy:
    return AuthPolicy(required=config.auth == "required", signup_open=config.signup == "open",
                      session_idle=config.session_idle, session_max_age=config.session_max_age,
                      login_attempts=config.login_attempts, login_window=config.login_window)


def check_account_settings(config: settings.Settings) -> None:
    """One line and exit code 1 for an account setting out of range."""
    for name in ("session_idle", "session_max_age", "login_window"):
        if not getattr(config, name) > 0:
            raise SystemExit(f"chatterd: --{name.replace('_', '-')} must be more than 0 seconds")
    for name in ("login_attempts", "hash_workers"):
        if getattr(config, name) < 1:
            raise SystemExit(f"chatterd: --{name.replace('_', '-')} must be at least 1")
    for name in ("user_streams", "user_rate"):
        if getattr(config, name) < 0:
            raise SystemExit(f"chatterd: --{name.replace('_', '-')} must be 0 (no limit) or more")


def read_new_password() -> str:
    """The new account's password: one line of standard input (asked for, unechoed, on a
    terminal), never the command line, where every user of the machine could read it."""
    if sys.stdin is None:
        raise SystemExit("chatterd: --add-user reads the password from standard input, which is closed")
    if sys.stdin.isatty():
        return getpass.getpass("password: ")
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


async def add_user(config: settings.Settings, password: str) -> None:
    """--add-user NAME: validate, hash (in a worker process), store; one line either way."""
    try:
        name = rules.username(config.add_user)
        password = rules.password(password)
    except rules.RuleError as e:
        raise SystemExit(f"chatterd: cannot add the user: {e}") from None
    pool = await open_database(config, import_course=False, ready=False)
    try:
        async with PasswordHasher(workers=1) as hasher:
            password_hash = await hasher.hash(password)
        user = await accounts.create_user(pool, name, rules.username_key(name), password_hash)
    except HasherError as e:
        raise SystemExit(f"chatterd: cannot add the user: {e}") from None
    except Exception as e:
        raise SystemExit(f"chatterd: cannot add the user: {describe_error(e)}") from None
    finally:
        await asyncio.wait_for(pool.close(), 10)
    if user is None:
        raise SystemExit(f"chatterd: cannot add the user: the username {name!r} is taken")
    print(f"chatterd: added user {user.username!r} (id {user.id})")


def run() -> None:
    """Parse the settings, pick the event loop, serve until SIGTERM/SIGINT."""
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        sys.stdout.write(settings.help_text())
        return
    try:
        config = settings.parse(args, os.environ)
    except settings.Error as e:
        raise SystemExit(f"chatterd: {e} (see --help)") from None
    check_account_settings(config)
    new_password = read_new_password() if config.add_user else None
    if config.event_loop == "uvloop":  # (the only other choice: asyncio's own loop)
        import uvloop  # measured: less CPU per event and per turn (docs/benchmarks.md)

        uvloop.install()
    asyncio.run(main(config, new_password))


if __name__ == "__main__":
    run()

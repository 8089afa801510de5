"""chatterd: the course's chat back end on Tornado, asyncpg and Ollama.

This module only wires things together: settings, the route list, the database,
the Ollama client, the HTTP server, and a graceful shutdown on SIGTERM/SIGINT.
Run `python chatterd.py --help` for every setting.
"""

import asyncio
from datetime import timedelta
import logging
import resource
import signal
from typing import Any

import tornado.locks
import tornado.web
from tornado.httpserver import HTTPServer

import metrics
import settings
from db import embedded, migrate, pool as db_pool
from handlers.base import NotFoundHandler
from handlers.board import GetChattsHandler, PostChattHandler, TopHandler
from handlers.chat import LLMChatHandler
from handlers.llm import LLMPrepHandler, LLMPromptHandler
from handlers.ops import HealthHandler, MetricsHandler, ReadyHandler
from ollama_client import OllamaClient

log = logging.getLogger("chatterd")
access_log = logging.getLogger("chatterd.access")

ROUTES = [
    (r"/", TopHandler),
    (r"/getchatts/?", GetChattsHandler),
    (r"/postchatt/?", PostChattHandler),
    (r"/llmprompt/?", LLMPromptHandler),
    (r"/llmprep/?", LLMPrepHandler),
    (r"/llmchat/?", LLMChatHandler),
    (r"/healthz/?", HealthHandler),
    (r"/readyz/?", ReadyHandler),
    (r"/metrics/?", MetricsHandler),
]


class Application(tornado.web.Application):
    """The routes plus what handlers share: the pool, the Ollama client, the live streams."""

    def __init__(self, pool: Any, ollama: OllamaClient, *, max_body_size: int = 1048576,
                 max_messages: int = 1000, heartbeat: float = 15.0,
                 status_grace: float = 2.0) -> None:
        self.pool = pool
        self.ollama = ollama
        self.draining = False
        self.in_flight: set = set()  # every request being handled, streams included
        self.request_finished = tornado.locks.Condition()
        super().__init__(ROUTES, default_handler_class=NotFoundHandler, log_function=log_request,
                         max_body_size=max_body_size, max_messages=max_messages, heartbeat=heartbeat,
                         status_grace=status_grace)

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
    route = request.path.rstrip("/") or "/"
    if isinstance(handler, NotFoundHandler):
        route = "unmatched"
    metrics.REQUESTS.labels(route=route, method=request.method, status=str(status)).inc()
    parts = [str(status), request.remote_ip, request.method, request.path,
             f"{1000.0 * request.request_time():.1f}ms"]
    for name in ("app_id", "tokens", "outcome", "error_message"):
        value = getattr(handler, name, None)
        if value is not None:
            parts.append(f"{'appID' if name == 'app_id' else name.replace('_message', '')}={value!r}"
                         if isinstance(value, str) else f"{name}={value}")
    level = logging.INFO if status < 500 else logging.WARNING
    access_log.log(level, " ".join(parts))


def raise_open_file_limit() -> None:
    # Every chat holds two sockets; the usual soft limit of 1024 caps us near 500 chats.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main() -> None:
    try:
        opts = settings.parse_settings()
    except settings.Error as e:
        raise SystemExit(f"chatterd: {e} (see --help)") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_file_limit()
    dsn = opts.database_url
    if not dsn:
        dsn = await embedded.ensure_database(embedded.start(opts.data_dir))
    pool = await db_pool.create_pool(dsn, max_size=opts.db_pool_size, timeout=opts.db_timeout)
    await migrate.migrate(pool)
    ollama = OllamaClient(opts.ollama_url, connect_timeout=opts.connect_timeout,
                          request_timeout=opts.request_timeout, idle_timeout=opts.idle_timeout,
                          max_streams=opts.max_streams)
    app = Application(pool, ollama, max_body_size=opts.max_body_size,
                      max_messages=opts.max_messages, heartbeat=opts.heartbeat,
                      status_grace=opts.status_grace)
    # The server's own cap sits above ours so oversized bodies get a 413, not a dropped connection.
    server = HTTPServer(app, xheaders=opts.xheaders, max_body_size=max(opts.max_body_size * 2, 1 << 26))
    server.listen(opts.port, opts.address)
    log.info("chatterd listening on http://%s:%d (Ollama at %s)", opts.address, opts.port, ollama.base)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new connections; %d request(s) in flight", len(app.in_flight))
    server.stop()
    await app.drain(opts.shutdown_grace)
    await asyncio.wait_for(server.close_all_connections(), 10)
    ollama.close()
    await asyncio.wait_for(pool.close(), 10)
    log.info("stopped")


if __name__ == "__main__":
    asyncio.run(main())

"""Accepting connections at the open-file limit without spinning or flooding the log.

Replaces: `tornado.netutil.add_accept_handler`, through `TCPServer.add_sockets`.
Why: Tornado lets EMFILE (too many open files) escape from `accept()`; the listening
socket stays readable, so the IOLoop calls the handler again at once: one core spins and
every call logs a traceback.
What it does instead: Tornado's accept loop, plus, when the process or the system is out
of descriptors (or buffers), stop watching the socket for *backoff* seconds and warn at
most once per *warn_every* seconds with a count.  Connections that arrive meanwhile wait
in the kernel's listen backlog and are accepted once descriptors are free again.
`GuardedHTTPServer` fills TCPServer's two private socket dicts the way `add_sockets` does.
Checked against: Tornado 6.6.1 (asyncio loop and uvloop 0.23).  tests/test_accept_guard.py
fails if a Tornado upgrade changes what this relies on.
"""

import errno
import logging
import os
import socket
from typing import Any, Callable, Iterable

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from runtime import lean_streams

log = logging.getLogger("chatterd")

# accept() errors that mean "not now", not "this socket is broken".
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BATCH = 128  # connections accepted per readiness event, as Tornado does (its listen backlog)


def add_accept_handler(sock: socket.socket, callback: Callable[[socket.socket, Any], None],
                       backoff: float = 0.5, warn_every: float = 10.0) -> Callable[[], None]:
    """Like `tornado.netutil.add_accept_handler`; returns the function that stops accepting."""
    io_loop = IOLoop.current()
    state = {"removed": False, "watching": False, "refused": 0, "warned_at": None, "warned": False}

    def watch() -> None:
        if not state["removed"] and not state["watching"]:
            state["watching"] = True
            io_loop.add_handler(sock, accept_handler, IOLoop.READ)

    def pause(error: OSError) -> None:
        state["refused"] += 1
        if state["watching"]:
            state["watching"] = False
            io_loop.remove_handler(sock)
        now = io_loop.time()
        if state["warned_at"] is None or now - state["warned_at"] >= warn_every:
            log.warning("cannot accept connections: %s (%d time(s) since the last warning); "
                        "pausing accepts for %g s at a time, new connections wait in the backlog",
                        os.strerror(error.errno or 0), state["refused"], backoff)
            state["refused"], state["warned_at"], state["warned"] = 0, now, True
        io_loop.call_later(backoff, watch)

    def accept_handler(fd: Any, events: int) -> None:
        for _ in range(BATCH):
            if state["removed"] or not state["watching"]:
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return  # accepted every connection that was waiting
            except ConnectionAbortedError:
                continue  # closed while still in the accept queue
            except OSError as e:
                if e.errno not in OUT_OF_RESOURCES:
                    raise
                pause(e)
                return
            if state["warned"]:
                state["warned"] = False
                log.info("accepting connections again")
            callback(connection, address)

    def remove_handler() -> None:
        if state["watching"]:
            io_loop.remove_handler(sock)
        state["removed"], state["watching"] = True, False

    watch()
    return remove_handler


class GuardedHTTPServer(HTTPServer):
    """An HTTPServer whose listening sockets accept through `add_accept_handler` above."""

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = add_accept_handler(sock, self._handle_connection)

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        super().handle_stream(lean_streams.lighten(stream), address)

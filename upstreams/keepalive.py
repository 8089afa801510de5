"""Upstream keep-alive: connections whose response ended cleanly are kept and handed to the
next request to the same upstream (upstreams/http.py keeps them, see AbortableConnection).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional

from tornado.iostream import IOStream, SSLIOStream
from tornado.netutil import Resolver
from tornado.tcpclient import TCPClient

from upstreams.stream import StreamState, stream_state

KEPT_FOR = 30.0  # seconds a kept-alive upstream connection may wait for its next request


def peer_silent(stream: IOStream) -> bool:
    """Whether nothing has come from the server on this idle connection: no close (FIN), no
    reset, no stray bytes.  The loop would notice them, but only at its next poll: a FIN
    that arrived right behind a response's last bytes (read_trickle takes just those) is
    otherwise found only once a request is written on the dead connection.  TLS streams
    are taken on trust (their socket cannot be peeked at below the TLS layer)."""
    if isinstance(stream, SSLIOStream) or stream.socket is None:
        return True
    try:
        stream.socket.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # nothing waiting: the connection is as it was left
    except OSError:
        return False
    return False  # b"" (closed) or bytes that belong to no request


class KeptAliveTCPClient(TCPClient):
    """TCPClient that hands out a kept connection to the same host and port when it has one
    (at most `max_idle` per upstream are kept; a kept one the server closes is dropped)."""

    def __init__(self, resolver: Resolver, max_idle: int) -> None:
        super().__init__(resolver=resolver)
        self.max_idle = max_idle
        self.idle: dict[tuple, list[IOStream]] = {}
        self.closed = False

    async def connect(self, host: str, port: int, af: socket.AddressFamily = socket.AF_UNSPEC,
                      ssl_options: Any = None, max_buffer_size: Optional[int] = None,
                      source_ip: Optional[str] = None, source_port: Optional[int] = None,
                      timeout: Any = None, fresh: bool = False) -> IOStream:
        """A kept connection to (host, port), else a new one; with *fresh*, always a new one."""
        key = (host, port, ssl_options is not None)
        idle = None if fresh else self.idle.get(key)
        now = time.monotonic()
        while idle:
            stream = idle.pop()
            stream.set_close_callback(None)
            # Not one kept longer than KEPT_FOR: a NAT or load balancer on the way may have
            # dropped it without telling either end, and a request written on it would wait
            # for the idle timeout.
            state = stream_state(stream)
            if not stream.closed() and not stream._read_buffer_size \
                    and now - state.kept_since < KEPT_FOR and peer_silent(stream):
                state.reused = True
                return stream
            stream.close()
        stream = await super().connect(host, port, af=af, ssl_options=ssl_options,
                                       max_buffer_size=max_buffer_size, source_ip=source_ip,
                                       source_port=source_port, timeout=timeout)
        stream.upstream = StreamState(key)  # type: ignore[attr-defined]
        return stream

    def keep(self, stream: IOStream) -> None:
        """A connection whose response ended cleanly, for the next request."""
        state = getattr(stream, "upstream", None)
        if state is None or state.pool_key is None:  # not one of ours: connect() never finds it
            stream.close()
            return
        idle = [] if self.closed else self.idle.setdefault(state.pool_key, [])
        if self.closed or len(idle) >= self.max_idle:
            stream.close()
            return
        state.kept_since = time.monotonic()
        idle.append(stream)
        # Also makes the stream watch for the server's close while nothing is read.
        stream.set_close_callback(lambda: stream in idle and idle.remove(stream))

    def drop_idle(self) -> None:
        """Close every kept connection (one turned out dead: the others may be too)."""
        for idle in self.idle.values():
            for stream in idle:
                stream.set_close_callback(None)
                stream.close()
        self.idle.clear()

    def close(self) -> None:
        self.closed = True
        self.drop_idle()
        super().close()


class FreshConnection:
    """The pool, for one request that must not take a kept connection: the retry of a
    request whose kept connection the server had closed (another one kept meanwhile may
    be just as dead: under load, turns keep connections between the retry's start and its
    connect)."""

    def __init__(self, pool: KeptAliveTCPClient) -> None:
        self.pool = pool

    async def connect(self, *args: Any, **kwargs: Any) -> IOStream:
        return await self.pool.connect(*args, fresh=True, **kwargs)

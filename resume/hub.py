"""This process's ear on PostgreSQL: LISTEN on a connection of its own, so readers of a
turn wake when any process checkpoints its events, a running turn stops when any process
is asked to stop it, and a stream is published when a reader on any process asks for it.

A lost notification (the connection broke, and is opened again on the next use) costs a
reader latency, not correctness: readers also look at the table every POLL seconds.
"""

import asyncio
import logging
from typing import Any, Callable, Optional

import asyncpg

from db import events

log = logging.getLogger("chatterd")

RETRY = 2.0  # seconds between attempts to LISTEN again after the connection was lost


class Hub:
    def __init__(self, pool: asyncpg.Pool, publish: Callable[[int], object]) -> None:
        self.pool = pool
        self._publish = publish  # called with a turn id a reader asked for
        self._con: Any = None
        self._connecting: Optional[asyncio.Task] = None
        self._readers: dict[int, set[asyncio.Future]] = {}
        self.stoppers: dict[int, Callable[[], None]] = {}  # this process's running turns
        self._closed = False
        self._warned = False

    def ensure(self) -> None:
        """Start listening, if not yet (without waiting)."""
        if self._con is None and self._connecting is None and not self._closed:
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        con = None
        try:
            con = await events.listen_connection(self.pool)
            await con.add_listener(events.EVENTS_CHANNEL, self._on_events)
            await con.add_listener(events.STOP_CHANNEL, self._on_stop)
            await con.add_listener(events.PUBLISH_CHANNEL, self._on_publish)
            con.add_termination_listener(self._on_lost)
            if self._closed:
                await con.close()
                return
            self._con = con
        except Exception as e:
            if not self._warned:  # one line per outage, not one per stream
                log.warning("cannot LISTEN for stream events (readers poll instead): %s", e)
                self._warned = True
            if con is not None:
                con.terminate()
            self._retry_soon()
        else:
            if self._warned:
                log.info("listening for stream events again")
            self._warned = False
        finally:
            self._connecting = None

    def _on_lost(self, con: Any) -> None:
        if self._con is con:
            self._con = None
            self._retry_soon()

    def _retry_soon(self) -> None:
        """Listen again shortly: this process's running turns must hear a stop."""
        if not self._closed:
            asyncio.get_running_loop().call_later(RETRY, self.ensure)

    def _on_events(self, con: Any, pid: int, channel: str, payload: str) -> None:
        for part in payload.split(","):
            try:
                self.wake(int(part))
            except ValueError:
                continue

    def _on_stop(self, con: Any, pid: int, channel: str, payload: str) -> None:
        try:
            turn_id = int(payload)
        except ValueError:
            return
        stop = self.stoppers.get(turn_id)
        if stop is not None:
            stop()

    def _on_publish(self, con: Any, pid: int, channel: str, payload: str) -> None:
        try:
            turn_id = int(payload)
        except ValueError:
            return
        self._publish(turn_id)

    def wake(self, turn_id: int) -> None:
        for waiter in self._readers.pop(turn_id, ()):
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, turn_id: int, timeout: float, also: Optional[asyncio.Future] = None) -> bool:
        """Wait until new events of *turn_id* are checkpointed, *timeout* passes, or *also*
        is done; True when woken by events."""
        waiter = asyncio.get_running_loop().create_future()
        self._readers.setdefault(turn_id, set()).add(waiter)
        waits = [waiter] if also is None else [waiter, also]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            readers = self._readers.get(turn_id)
            if readers is not None:
                readers.discard(waiter)
                if not readers:
                    del self._readers[turn_id]
        return waiter.done()

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._connecting), 5)
            except Exception:
                pass
        con, self._con = self._con, None
        if con is not None:
            try:
                await asyncio.wait_for(con.close(), 5)
            except Exception:
                con.terminate()

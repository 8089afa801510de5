"""Resumable streams: every event of a turn's stream has an id, is checkpointed to
PostgreSQL, and can be fetched again, stored part then live part, from any chatterd
process (docs/api.md, "Resuming a stream").

    resume = Resumption(pool, config)   # --resume-window, -retention, -checkpoint
    record = resume.record(turn.id, app_id, owner, keep)   # resume/record.py
    events = record.number(framed)                          # what the client is sent

Modules: record (numbering), checkpoint (the batched writes), hub (LISTEN/NOTIFY),
reader (a resumed stream's pages).
"""

import asyncio
import logging
from typing import Callable, Optional

import asyncpg

from db import events
from db.pool import DatabaseUnavailable
from resume.checkpoint import Checkpointer
from resume.hub import Hub
from resume.record import TurnRecord
from settings import Settings

log = logging.getLogger("chatterd")

FORGET_AFTER = 86400.0  # seconds a stream's row outlives its retention (410, then 404)


class Resumption:
    """This process's part of resumable streams: the checkpointer, the hub, the purge."""

    def __init__(self, pool: asyncpg.Pool, config: Settings) -> None:
        self.pool = pool
        self.window = config.resume_window  # most seconds a turn may go on without its client
        self.retention = config.resume_retention
        self.checkpointer = Checkpointer(pool, config.resume_checkpoint)
        self.hub = Hub(pool)
        self._purger: Optional[asyncio.Task] = None

    def record(self, turn_id: int, app_id: str, owner: int = 0, keep: float = 0.0) -> TurnRecord:
        """The record of a streamed turn; the process starts listening with its first."""
        self.hub.ensure()
        if self._purger is None:
            self._purger = asyncio.ensure_future(self._purge_forever())
        return TurnRecord(self.checkpointer, turn_id, app_id, owner, keep)

    def keep_seconds(self, header: Optional[str]) -> float:
        """The seconds an X-Chatterd-Keep-Generating header asks for, capped by the window;
        ValueError if it is not a number of seconds."""
        if header is None or self.window <= 0:
            return 0.0
        value = float(header.strip())
        if not value >= 0 or value == float("inf"):
            raise ValueError(header)
        return min(value, self.window)

    def running(self, turn_id: int, stop: Callable[[], None]) -> None:
        self.hub.stoppers[turn_id] = stop

    def ended(self, turn_id: int) -> None:
        self.hub.stoppers.pop(turn_id, None)

    async def stop(self, turn_id: int) -> None:
        """Stop the running turn, on whichever process runs it."""
        stop = self.hub.stoppers.get(turn_id)
        if stop is not None:
            stop()
            return
        await events.notify_stop(self.pool, turn_id)

    async def stop_if_detached(self, owner_id: int, app_id: str, turn_id: int) -> None:
        """A new turn of (*owner_id*, *app_id*) waits behind *turn_id*: stop it if its client
        left."""
        try:
            if await events.detached_turn(self.pool, owner_id, app_id, turn_id):
                await self.stop(turn_id)
        except DatabaseUnavailable as e:
            log.warning("could not check whether turn %d is detached: %s", turn_id, e)

    async def _purge_forever(self) -> None:
        every = min(60.0, max(1.0, self.retention / 2))
        while True:
            await asyncio.sleep(every)
            try:
                await events.purge(self.pool, self.retention, FORGET_AFTER)
            except (DatabaseUnavailable, asyncpg.PostgresError) as e:
                log.warning("could not purge old stream events: %s", e)

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None
        await self.checkpointer.drain()
        self.checkpointer.close()
        await self.hub.close()

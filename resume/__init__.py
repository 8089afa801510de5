"""Resumable streams: every event of a turn's stream has an id, and can be fetched again,
stored part then live part, from any chatterd process (docs/api.md, "Resuming a stream").

    resume = Resumption(pool, config)   # --resume-window, -retention, -checkpoint, -linger
    record = resume.record(turn.id, app_id, owner, keep)   # resume/record.py
    events = record.number(framed)                          # what the client is sent
    await resume.publish(turn_id)       # a reader wants it: checkpoint it from now on

A stream is written to PostgreSQL only once a resume may need it (resume/record.py says
when).  One whose client was there to its end stays in this process's memory for
--resume-linger seconds (LINGER_BYTES for all of them, oldest out first), published only
if a reader asks for it meanwhile, or when the process shuts down.

Modules: record (numbering), checkpoint (the batched writes), hub (LISTEN/NOTIFY),
reader (a resumed stream's pages).
"""

import asyncio
import logging
from collections import OrderedDict
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
LINGER_BYTES = 64 << 20  # bytes of delivered streams one process keeps for a late resume


class Resumption:
    """This process's part of resumable streams: the checkpointer, the hub, the purge."""

    def __init__(self, pool: asyncpg.Pool, config: Settings) -> None:
        self.pool = pool
        self.window = config.resume_window  # most seconds a turn may go on without its client
        self.retention = config.resume_retention
        self.linger = config.resume_linger
        self.checkpointer = Checkpointer(pool, config.resume_checkpoint)
        self.hub = Hub(pool, self.publish_here)
        self._purger: Optional[asyncio.Task] = None
        # This process's opened streams a reader may ask for: running, and lingering.
        self.records: dict[int, TurnRecord] = {}
        self._lingering: "OrderedDict[int, float]" = OrderedDict()  # turn id -> until when
        self.lingering_bytes = 0

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

    def running(self, record: TurnRecord, stop: Callable[[], None]) -> None:
        """*record*'s stream is open: it can be stopped and published from any process."""
        self.hub.stoppers[record.turn_id] = stop
        self.records[record.turn_id] = record

    def ended(self, record: TurnRecord, delivered: bool) -> None:
        """*record*'s turn is over and its stream numbered to the end.  *delivered*: the whole
        stream went to a client still connected, which will most likely never resume it;
        kept in memory a while for the one that does.  Any other is published."""
        turn_id = record.turn_id
        self.hub.stoppers.pop(turn_id, None)
        self._forget_lingering()
        if not record.opened:
            self.records.pop(turn_id, None)
        elif delivered and not record.published and self.linger > 0 \
                and record.unsaved_bytes <= LINGER_BYTES:
            self._lingering[turn_id] = asyncio.get_running_loop().time() + self.linger
            self.lingering_bytes += record.unsaved_bytes
            self._forget_lingering()
        else:
            self.records.pop(turn_id, None)
            record.publish("client_left")

    def _forget_lingering(self) -> None:
        """Drop the lingering streams past --resume-linger, and the oldest beyond LINGER_BYTES."""
        now = asyncio.get_running_loop().time()
        while self._lingering:
            turn_id, until = next(iter(self._lingering.items()))
            if until > now and self.lingering_bytes <= LINGER_BYTES:
                break
            self._unlinger(turn_id)

    def _unlinger(self, turn_id: int) -> Optional[TurnRecord]:
        if self._lingering.pop(turn_id, None) is None:
            return None
        record = self.records.pop(turn_id)
        self.lingering_bytes -= record.unsaved_bytes
        return record

    def publish_here(self, turn_id: int, reason: str = "asked") -> bool:
        """Publish *turn_id*'s stream if this process holds it; False if it does not."""
        self._forget_lingering()
        until = self._lingering.get(turn_id)
        record = self._unlinger(turn_id) or self.records.get(turn_id)
        if record is None or (until is not None and until <= asyncio.get_running_loop().time()):
            return False
        record.publish(reason)
        return True

    async def publish(self, turn_id: int) -> None:
        """A reader asks for *turn_id*'s events (its owner checked): have the process that
        holds its stream publish it."""
        if not self.publish_here(turn_id):
            await events.notify_publish(self.pool, turn_id)

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
            self._forget_lingering()
            try:
                await events.purge(self.pool, self.retention, FORGET_AFTER)
            except (DatabaseUnavailable, asyncpg.PostgresError) as e:
                log.warning("could not purge old stream events: %s", e)

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None
        for turn_id in list(self._lingering):  # resumable from the other processes
            self.publish_here(turn_id, "shutdown")
        await self.checkpointer.drain()
        self.checkpointer.close()
        await self.hub.close()

"""Writes this process's published turns' new events to PostgreSQL, all in one statement,
every `interval` seconds (and at once for a stream's publication and its last event).

The relay only appends bytes to its TurnRecord (resume/record.py) and marks it: no
statement per token, nothing awaited on the hot path.  A checkpoint that fails (the
database is away) is put back and tried again at the next interval.
"""

import asyncio
import logging
from typing import Optional

import asyncpg

from db import events
from db.pool import DatabaseUnavailable
from resume.record import TurnRecord

log = logging.getLogger("chatterd")

MAX_BYTES = 64 * 1024  # unsaved bytes of one turn that bring its checkpoint forward
BATCH_BYTES = 1 << 20  # bytes of events one checkpoint statement carries, at most about
# An urgent checkpoint (a stream's end) waits this long for others to join it: turns ending
# together share a statement instead of each starting one.
SOON = 0.01  # seconds


class Checkpointer:
    def __init__(self, pool: asyncpg.Pool, interval: float = 0.2) -> None:
        self.pool = pool
        self.interval = interval
        self.max_bytes = MAX_BYTES
        self._dirty: dict[int, TurnRecord] = {}
        self._timer: Optional[asyncio.TimerHandle] = None
        self._flight: Optional[asyncio.Task] = None
        self._soon = False  # a checkpoint is wanted as soon as the one in flight is done
        self._timer_due = 0.0  # the delay _timer was armed with
        self._started: Optional[asyncio.Future] = None  # resolved when the next flight starts
        self._failing = False
        self.written = 0  # checkpoints written (for tests and the bench)

    def mark(self, record: TurnRecord, at_once: bool = False) -> None:
        self._dirty[record.turn_id] = record
        if self._flight is not None:
            if at_once:
                self._soon = True  # right after the one in flight
            return
        # (While the database is away, every checkpoint waits for the interval.)
        if at_once and not self._failing and (self._timer is None or self._timer_due > SOON):
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_due = asyncio.get_running_loop().call_later(SOON, self._start), SOON
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._start)
            self._timer_due = self.interval

    async def sync(self, record: TurnRecord) -> bool:
        """Wait until everything *record* has numbered is checkpointed (or one checkpoint
        failed); True if it is."""
        while True:
            if record.dirty:
                self.mark(record, at_once=True)
            elif self._flight is None or record.turn_id not in self._in_flight:
                return True
            if self._flight is None:  # armed to start in SOON seconds
                if self._started is None:
                    self._started = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._started)
            flight = self._flight
            if flight is not None and not await asyncio.shield(flight):
                return False

    _in_flight: frozenset = frozenset()

    @property
    def failing(self) -> bool:
        """The last checkpoint failed (the database is away)."""
        return self._failing

    def _start(self) -> None:
        if self._flight is not None:
            self._soon = True
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dirty:
            self._flight = asyncio.ensure_future(self._write())
            if self._started is not None:
                self._started.set_result(None)
                self._started = None

    async def _write(self) -> bool:
        # A bounded statement: turns beyond BATCH_BYTES wait for the next one, at once.
        batch, size = [], 0
        for turn_id in list(self._dirty):
            record = self._dirty.pop(turn_id)
            batch.append(record)
            size += record.unsaved_bytes
            if size >= BATCH_BYTES and self._dirty:
                self._soon = True
                break
        self._in_flight = frozenset(r.turn_id for r in batch)
        taken = [r.take() for r in batch]
        ok = True
        try:
            await events.write_checkpoint(self.pool, [t[0] for t in taken if t[0] is not None],
                                          [c for t in taken for c in t[1]])
            self.written += 1
            for record, t in zip(batch, taken):
                record.saved(t)
            if self._failing:
                log.info("stream checkpoints written again")
                self._failing = False
        except (DatabaseUnavailable, asyncpg.PostgresError, OSError) as e:
            ok = False
            for record, t in zip(batch, taken):
                record.untake(t)
                self._dirty.setdefault(record.turn_id, record)
            if not self._failing:
                log.warning("cannot checkpoint %d stream(s): %s", len(batch), e)
                self._failing = True
        finally:
            self._in_flight = frozenset()
            self._flight = None
        soon, self._soon = self._soon, False
        if self._dirty:
            if soon and ok:
                self._start()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.interval, self._start)
                self._timer_due = self.interval
        return ok

    async def drain(self) -> None:
        """Write what is left (at shutdown): one more try for a failed checkpoint."""
        for _ in range(2):
            if self._flight is not None:
                await asyncio.shield(self._flight)
            if not self._dirty:
                return
            self._start()
            if self._flight is not None and not await asyncio.shield(self._flight):
                continue

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

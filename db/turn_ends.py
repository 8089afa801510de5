"""Turn ends stored together: turns that end while others' ends are being stored share one
statement (db/conversations.py end_turns) instead of each waiting for a connection of its own.

Why: a stream's `done` waits for its turn's end to be stored.  When many turns end at once
(streams that began together), one statement each would queue for the pool's connections,
each hand-over costing an event-loop iteration, which is long while the loop relays
thousands of events a second: the last `done` of the burst would wait for all of them.
With one statement per group, a burst costs a few round trips.

An end runs its statement at once, in its own coroutine (no timer, no added hop), when the
pool has a connection free or no other end statement is running: under a light load ends
go in parallel, as many as connections are free.  Otherwise (the pool is busy) it waits,
and when a running end statement is done the next one takes all the waiting ends (up to
MOST)."""

import asyncio
from typing import Optional

import asyncpg

from db import conversations
from db.conversations import Reply

FLIGHTS = 8  # end statements running at once, at most
MOST = 100  # turns one statement ends, at most

End = tuple[int, int, str, Optional[str], Reply]  # owner_id, turn_id, status, error, reply


class TurnEnds:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._waiting: list[tuple[End, asyncio.Future]] = []
        self._flights = 0
        self.statements = 0  # end statements sent (for tests and the bench)

    @property
    def waiting(self) -> int:
        """Ends waiting for a statement."""
        return len(self._waiting)

    async def store(self, end: End) -> str:
        """end_turn(*end*) (its reply batchable()), with whatever else is ending: its outcome."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((end, future))
        if self._flights == 0 or (self._flights < FLIGHTS and self.pool.get_idle_size() > 0):
            await self._fly(future)  # this coroutine carries the statement: no hand-over
        return await future

    async def _fly(self, own: Optional[asyncio.Future] = None) -> None:
        batch, self._waiting = self._waiting[:MOST], self._waiting[MOST:]
        if not batch:
            return
        self._flights += 1
        try:
            await self._store(batch)
        except BaseException:
            # The coroutine carrying the statement was cancelled: its own end is dropped (as
            # a cancelled end_turn would be); the others' go again (end_turn is idempotent).
            if own is not None:
                own.cancel()
            self._waiting[:0] = [(end, f) for end, f in batch if not f.done()]
            raise
        finally:
            self._flights -= 1
            if self._waiting and self._flights < FLIGHTS:
                asyncio.ensure_future(self._fly())  # those that came meanwhile

    async def _store(self, batch: list[tuple[End, asyncio.Future]]) -> None:
        ends = [end for end, _ in batch]
        self.statements += 1
        try:
            outcomes: list = await conversations.end_turns(self.pool, ends)
        except asyncpg.PostgresError:
            # One turn's values failed the statement, and with it the others: each on its own,
            # so only that one fails.
            outcomes = await asyncio.gather(
                *(conversations.end_turn(self.pool, *end) for end in ends), return_exceptions=True)
        except Exception as e:  # DatabaseUnavailable: each waiter retries or fails as usual
            outcomes = [e] * len(batch)
        for (_, future), outcome in zip(batch, outcomes):
            if future.done():  # its waiter was cancelled
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

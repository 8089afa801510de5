"""The life of a turn: one at a time per appID, entering the conversation whole when it ends.

    turn = await app.turns.begin(owner_id, app_id, messages, left=client_left)  # waits its turn
    ... relay the reply ...
    await turn.end("complete", reply)      # or "interrupted"/"failed"; turn.reject(reason)

A conversation is (owner_id, appID) (db/conversations.py): every turn, lease, resend,
wait and cached history here is keyed by both, so the same appID under two owners is two
conversations that never wait for, read or extend each other.
`begin` stores the incoming messages as pending and takes the appID's lease in
PostgreSQL, so turns of one conversation never overlap, across processes and machines.  A turn
that finds the appID busy waits (a stop-then-type turn sees the interrupted reply
first) for up to --turn-wait seconds, then gets 409.  This process renews its leases;
when it dies, they expire after --turn-lease seconds and the next turn marks the dead
one abandoned.  `end` is idempotent and retried for --store-retry seconds, which
bridges a short database outage without ever storing a reply twice.  A turn stored
complete whose `done` never reached the client (its process died in between) is not
stored again when the client resends it within --resend-window: `begin` returns it with
`replay` set, and the stored answer is sent again.
"""

import asyncio
import logging
import os
import re
import socket
import uuid
from typing import Any, Awaitable, Callable, Optional, Protocol

import asyncpg

import metrics
from settings import Settings
from db import conversations
from db.conversations import Reply, TurnKey, Window
from db.history_cache import HistoryCache
from db.pool import DatabaseUnavailable
from db.turn_ends import TurnEnds
from turns.forecast import Forecasts, Speculation, after_turn, same_messages, with_new_messages

log = logging.getLogger("chatterd")

_SURROGATE = re.compile("[\ud800-\udfff]")


DELIVERY_FLUSH = 0.2  # seconds
RESERVED = 3  # pool connections begins leave to turn ends and checkpoints (a third, at most)
CUT_WARNING_EVERY = 60.0  # seconds between "Ollama cut the prompt" warnings


class Signal(Protocol):
    """What a wait can end on besides its own timeout: an asyncio.Event, or handlers.base.Flag."""

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class TurnBusy(Exception):
    """Another turn of the appID kept running for the whole --turn-wait."""


class ClientLeft(Exception):
    """The client went away while its turn was waiting."""


class TurnNotStored(Exception):
    """The turn's end could not be stored (the database stayed away, or the lease was lost)."""


class TurnKeeper:
    """This process's turns: begins them, renews their leases, wakes local waiters.

    Its durations (--turn-lease, --turn-wait, --store-retry, --resend-window) and the size
    of its history cache (--history-cache) come from *config*."""

    def __init__(self, pool: asyncpg.Pool, config: Settings) -> None:
        self.pool = pool
        self.history = HistoryCache(config.history_cache)  # conversations read, by (owner, appID)
        # What the next turn of a conversation that ended here will be sent (--early-upstream)
        self.forecasts = Forecasts(config.history_cache if config.early_upstream else 0)
        self.ends = TurnEnds(pool)  # turns ending together are stored in one statement
        # Begins take at most this many of the pool's connections: the rest stay free for
        # the statements a waiting client's `done` or a stream's checkpoint needs.  (A burst
        # of begins otherwise fills the pool's queue, and each end waits behind all of it.)
        self._begin_slots = asyncio.Semaphore(begin_slots(config.db_pool_size))
        self.resend_window = config.resend_window
        self.lease = config.turn_lease
        self.wait = config.turn_wait
        self.store_retry = config.store_retry
        # This process, as turns and leases name the one running a turn (their `owner`).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: set[TurnKey] = set()  # this process's running turns (their leases renew)
        # (owner_id, appID) -> set when a turn of that conversation ends here
        self._ended: dict[tuple[int, str], asyncio.Event] = {}
        self._renewer: Optional[asyncio.Task] = None
        # Turns whose end reached the client, not yet recorded: the next begin_turn records
        # them (no round trip of their own), or a flush DELIVERY_FLUSH seconds later.
        self._delivered: list[TurnKey] = []
        self._flush: Optional[asyncio.TimerHandle] = None
        self.delivery_flush = DELIVERY_FLUSH
        self._cut_warned_at: Optional[float] = None  # see warn_cut
        self._cut_unlogged = 0
        # Called with (owner, appID, the running turn's id) each time a turn finds its
        # conversation busy (resume/: a turn whose client left is stopped, so the new one
        # need not wait for it).
        self.on_busy: Optional[Callable[[int, str, int], Awaitable[None]]] = None

    def _start_renewing(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.ensure_future(self._renew_forever())

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    async def begin(self, owner_id: int, app_id: str, messages: list[dict], *,
                    left: Optional["Signal"] = None, replace: bool = False,
                    budget: Optional[int] = None, context: Optional[int] = None,
                    speculation: Optional[Speculation] = None) -> "Turn":
        """Store *messages* as a pending turn of *owner_id*'s conversation *app_id* once no
        other turn of it runs.

        The turn's history is its system prompts, the newest whole earlier turns that fit
        *budget* tokens with *messages*, and *messages* (budget None: everything);
        `turn.window` says what was sent and left out; *context* is recorded with it.

        Raises TurnBusy after --turn-wait seconds, ClientLeft when *left* is set while
        waiting, DatabaseUnavailable when PostgreSQL is away (nothing is then stored).
        *speculation* is settled after the first try (see Speculation), whatever its outcome.
        """
        self._start_renewing()
        if replace:
            self.forecasts.forget(owner_id, app_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        pause = 0.01
        waited = False
        waited_for: Optional[int] = None
        while True:
            delivered, self._delivered = self._delivered, []
            try:
                async with self._begin_slots:
                    begun = await conversations.begin_turn(self.pool, owner_id, app_id, self.owner,
                        self.lease, messages, replace=replace, resend_seconds=self.resend_window,
                        budget=budget, context=context, delivered=delivered,
                        waited_for=waited_for, cache=self.history)
            except BaseException:
                self._delivered[:0] = delivered  # not recorded: keep them for the next try
                if speculation is not None:
                    speculation.settle(False)
                raise
            turn_id, history, window, replay = begun
            sent = None
            if turn_id is not None and replay is None:
                sent = with_new_messages(history, messages)
            if speculation is not None:
                speculation.settle(sent is not None and same_messages(sent, speculation.history))
                speculation = None
            if turn_id is not None:
                if waited:
                    metrics.TURN_WAITS.labels(outcome="started").inc()
                if replay is not None:
                    metrics.RESENDS_REPLAYED.inc()
                    turn = Turn(self, owner_id, app_id, turn_id, [])
                    turn.ended, turn.replay = True, replay
                    return turn
                self.running.add((owner_id, turn_id))
                # While it runs, its conversation is not forecast (a turn arriving meanwhile
                # waits for it); its end says what the conversation is then.
                prior = self.forecasts.forget(owner_id, app_id)
                turn = Turn(self, owner_id, app_id, turn_id, sent)
                turn.resend_of = prior.incoming if prior is not None else []
                turn.before, turn.window, turn.incoming = history, window, messages
                return turn
            waited = True
            if waited_for is None:  # the turn this request arrived behind
                waited_for = (replay or {}).get("waiting_for")
            if waited_for is not None and self.on_busy is not None:
                # Asked at each try: its process may notice only now that its client left.
                await self.on_busy(owner_id, app_id, waited_for)
            if loop.time() >= deadline:
                metrics.TURN_WAITS.labels(outcome="busy").inc()
                raise TurnBusy()
            # A turn ending in this process wakes us at once; one ending in another
            # process is seen at the next try (pauses grow to 0.25 s).
            ended = self._ended.setdefault((owner_id, app_id), asyncio.Event())
            waits = [asyncio.ensure_future(ended.wait())]
            if left is not None:
                waits.append(asyncio.ensure_future(left.wait()))
            await asyncio.wait(waits, timeout=min(pause, max(deadline - loop.time(), 0)),
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if left is not None and left.is_set():
                metrics.TURN_WAITS.labels(outcome="client_left").inc()
                raise ClientLeft()
            pause = min(pause * 2, 0.25)

    def forget(self, owner_id: int, app_id: str) -> None:
        """The conversation was deleted: let its cached history go."""
        self.history.forget(owner_id, app_id)
        self.forecasts.forget(owner_id, app_id)

    def note_delivered(self, turn: TurnKey) -> None:
        self._delivered.append(turn)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(
                self.delivery_flush, lambda: asyncio.ensure_future(self.flush_delivered()))

    async def flush_delivered(self) -> None:
        """Record the deliveries noted since the last begin_turn (also called at shutdown)."""
        if self._flush is not None:
            self._flush.cancel()
        self._flush = None
        delivered, self._delivered = self._delivered, []
        if not delivered:
            return
        try:
            await conversations.mark_delivered(self.pool, delivered)
        except DatabaseUnavailable as e:
            # Best effort: an unrecorded delivery only means a resend within --resend-window
            # gets the stored answer again, which is still right.
            log.warning("could not record %d delivered turn(s): %s", len(delivered), e)

    def warn_cut(self, turn: "Turn", prompt_tokens: Optional[int]) -> None:
        """Log that Ollama cut *turn*'s prompt: the first time, then at most once per
        CUT_WARNING_EVERY seconds with the number of turns since (an upstream that always
        under-counts, such as an Ollama from before its PR #5371 on a cache hit, must not write a
        line per turn; chatterd_context_upstream_cut_total counts every one)."""
        now = asyncio.get_running_loop().time()
        if self._cut_warned_at is not None and now - self._cut_warned_at < CUT_WARNING_EVERY:
            self._cut_unlogged += 1
            return
        since = f" ({self._cut_unlogged} more such turns since the last warning)" \
            if self._cut_unlogged else ""
        self._cut_warned_at, self._cut_unlogged = now, 0
        log.warning("turn %d of appID %r: Ollama counted %s prompt tokens, fewer than were "
                    "sent (%s): it cut the prompt%s", turn.id, turn.app_id, prompt_tokens,
                    turn.window.describe(), since)

    def _turn_ended(self, turn: "Turn") -> None:
        self.running.discard((turn.owner_id, turn.id))
        ended = self._ended.pop((turn.owner_id, turn.app_id), None)
        if ended is not None:
            ended.set()

    async def _renew_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.lease / 3)
            if not self.running:
                continue
            try:
                await conversations.renew_leases(self.pool, self.owner, self.lease,
                                                 list(self.running))
                if failing:
                    log.info("turn leases renewed again")
                failing = False
            except DatabaseUnavailable as e:
                if not failing:  # one line per outage, not one per beat
                    log.warning("cannot renew turn leases: %s", e)
                failing = True


def begin_slots(pool_size: int) -> int:
    """How many of *pool_size* connections begins may hold at once: all but a third of them
    (RESERVED at most), so that a small pool still begins turns in parallel."""
    return max(1, pool_size - min(RESERVED, pool_size // 3))


class Turn:
    """One running turn: its id, the messages the model is sent, and how it ends."""

    def __init__(self, keeper: TurnKeeper, owner_id: int, app_id: str, turn_id: int,
                 history: list[dict]) -> None:
        self.keeper = keeper
        self.owner_id = owner_id
        self.app_id = app_id
        self.id = turn_id
        self.history = history  # the conversation before this turn, and its own messages
        self.before: list[dict] = []  # the conversation before this turn, as sent with it
        self.incoming: list[dict] = []  # its messages, as the client sent them
        self.resend_of: list[dict] = []  # the last ended turn's, as far as this process knows
        self.window = Window()  # what of the conversation the history holds, what it leaves out
        self.ended = False
        self.suspect = False  # Ollama reported fewer prompt tokens than were sent
        # A resend of a turn stored but never delivered: its stored reply, to be sent
        # again (nothing new is stored; see TurnKeeper.begin).
        self.replay: Optional[dict] = None

    async def end(self, status: str, reply: Optional[Reply] = None,
                  error: Optional[str] = None) -> None:
        """Enter the turn into the conversation as *status*, with *reply*, in one transaction.

        Retried while the database is away, up to --store-retry seconds; raises
        TurnNotStored when that did not work or the turn was taken over meanwhile.
        """
        if reply is not None:
            reply.content = storable(reply.content)
            reply.extra = storable(reply.extra)
            reply.error = storable(reply.error)
            reply.before = storable(reply.before)
            reply.after = storable(reply.after)
        error = storable(error if reply is None else reply.error)
        try:
            outcome = await self._store(status, error, reply)
        finally:
            if not self.ended:
                self.ended = True
                self.keeper._turn_ended(self)
        self.keeper.forecasts.remember(self, after_turn(self, status, reply, outcome))
        self.suspect = outcome == "stored-suspect"
        if self.suspect:
            metrics.CONTEXT_UPSTREAM_CUT.inc()
            self.keeper.warn_cut(self, reply.prompt_tokens if reply else None)
        if outcome == "lost":
            raise TurnNotStored("the turn was taken over: its lease expired while the "
                                "database was unreachable")

    async def delivered(self) -> None:
        """The client has the turn's end: a later identical turn is a new question, not a
        resend.  Recorded with this process's next begin_turn, or DELIVERY_FLUSH seconds
        later (so a repeat sent to another process within that time is answered from
        storage, which is still right)."""
        self.keeper.note_delivered((self.owner_id, self.id))

    async def reject(self, reason: str) -> None:
        """End a turn whose answer never started: it never enters the conversation.

        Failing to record that is harmless (the lease expires and the turn is abandoned),
        so it is only logged.
        """
        try:
            await self.end("rejected", error=reason)
        except (TurnNotStored, DatabaseUnavailable) as e:
            log.warning("could not mark turn %d of appID %r rejected (%s); its lease will "
                        "expire instead", self.id, self.app_id, e)

    async def _store(self, status: str, error: Optional[str], reply: Optional[Reply]) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.keeper.store_retry
        pause = 0.1
        while True:
            try:
                if reply is not None and conversations.batchable(reply):
                    return await self.keeper.ends.store((self.owner_id, self.id, status, error,
                                                         reply))
                return await conversations.end_turn(self.keeper.pool, self.owner_id, self.id,
                                                    status, error, reply)
            except DatabaseUnavailable:
                if loop.time() + pause > deadline:
                    raise
                metrics.STORE_RETRIES.inc()
                await asyncio.sleep(pause)  # the database is away: try again shortly
                pause = min(pause * 2, 1.0)


def storable(value):  # type: ignore[no-untyped-def]
    """*value* with every U+0000 and lone surrogate replaced by U+FFFD: PostgreSQL text and
    jsonb cannot hold them, and a model's reply must not be lost for one character."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = _SURROGATE.sub("\ufffd", value)
        return value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value

"""Timers for long per-stream deadlines that need no precision: an SSE stream's heartbeat,
an upstream call's idle and total timeouts.

Replaces: `loop.call_later` (and Tornado's per-request `request_timeout` timer) for those
deadlines.
Why: a loop timer (uvloop's TimerHandle and its libuv handle) costs about 540 bytes, and
an open stream would keep three; memory per open stream is what limits how many streams
one process holds (bench/scale.py).
What it does instead: each deadline is a small object in its time slot (RESOLUTION
seconds wide) and one loop timer per event loop waits for the earliest slot.  A timer
fires in the loop pass after its slot ends: up to RESOLUTION late, never early by more
than the loop clock's 1 ms, so a callback that must not run early checks its own clock
(both users re-check how long it has been quiet).
Checked against: asyncio (Python 3.11) and uvloop 0.23; uses only public loop API.

    timer = coarse_timers.call_later(15.0, beat)   # from a coroutine or callback on the loop
    timer.cancel()
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from typing import Callable, Optional

RESOLUTION = 0.02  # seconds per slot


class CoarseTimer:
    """One pending callback; cancel() drops it (and it is forgotten at once)."""

    __slots__ = ("wheel", "slot", "callback")

    def __init__(self, wheel: "TimerWheel", slot: int, callback: Callable[[], object]) -> None:
        self.wheel = wheel
        self.slot = slot
        self.callback: Optional[Callable[[], object]] = callback

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.wheel.forget(self)

    def cancelled(self) -> bool:
        return self.callback is None


class TimerWheel:
    """The coarse timers of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: _wheels is keyed by the loop, which a strong reference here would keep
        # alive for ever (a test suite makes a loop per test).
        self._loop = weakref.ref(loop)
        self.slots: dict[int, dict[CoarseTimer, None]] = {}  # insertion order: firing order
        self.due: list[int] = []  # heap of slot numbers (some may have been emptied since)
        # The slot the loop timer is set for.  Its handle is not kept (it refers to the
        # loop): one set for a later slot that an earlier one superseded just returns.
        self.armed_for: Optional[int] = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None  # (only called from the loop's own callbacks)
        return loop

    def call_later(self, delay: float, callback: Callable[[], object]) -> CoarseTimer:
        slot = math.ceil((self.loop.time() + max(delay, 0.0)) / RESOLUTION)
        timers = self.slots.get(slot)
        if timers is None:
            timers = self.slots[slot] = {}
            heapq.heappush(self.due, slot)
            if self.armed_for is None or slot < self.armed_for:
                self._arm(slot)
        timer = CoarseTimer(self, slot, callback)
        timers[timer] = None
        return timer

    def forget(self, timer: CoarseTimer) -> None:
        timers = self.slots.get(timer.slot)
        if timers is not None:
            timers.pop(timer, None)
            if not timers:  # (its heap entry goes when the slot's time comes)
                del self.slots[timer.slot]

    def _arm(self, slot: int) -> None:
        self.armed_for = slot
        self.loop.call_at(slot * RESOLUTION, self._fire, slot)

    def _fire(self, slot: int) -> None:
        if slot != self.armed_for:  # superseded by an earlier slot
            return
        self.armed_for = None
        # The loop's clock has a 1 ms grain: a slot ending within it is due now.
        now = math.floor((self.loop.time() + 0.001) / RESOLUTION)
        fired = []
        while self.due and self.due[0] <= now:
            fired.append(self.slots.pop(heapq.heappop(self.due), None))
        # Timers the callbacks set, however short, wait for the next pass.
        for timers in fired:
            for timer in timers or ():
                callback, timer.callback = timer.callback, None
                if callback is None:
                    continue
                try:
                    callback()
                except Exception as e:  # as the loop does for its own callbacks
                    self.loop.call_exception_handler(
                        {"message": "Exception in a coarse timer's callback",
                         "exception": e, "callback": callback})
        while self.due and self.due[0] not in self.slots:  # emptied by cancels
            heapq.heappop(self.due)
        if self.due:
            self._arm(self.due[0])


_wheels: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TimerWheel]" = \
    weakref.WeakKeyDictionary()


def call_later(delay: float, callback: Callable[[], object]) -> CoarseTimer:
    """Call *callback* (no arguments) once, *delay* seconds from now, on the running loop."""
    loop = asyncio.get_running_loop()
    wheel = _wheels.get(loop)
    if wheel is None:
        wheel = _wheels[loop] = TimerWheel(loop)
    return wheel.call_later(delay, callback)

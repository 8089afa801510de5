"""When Python's cyclic garbage collector may pause chatterd.

Replaces: CPython's automatic full ("generation 2") collections.
Why: CPython collects the whole heap each time the objects that survived younger
collections grew by a quarter.  Open streams are long-lived objects, so while thousands
of streams open that happens again and again, and each full collection walks every live
object and stops every stream at once (about 150 ms with 3,000 open streams,
bench/scale.py).  Almost everything chatterd allocates is freed by reference counting;
cycles are rare.
What it does instead:
* what start-up loaded (modules, settings, the app) is frozen: never traversed again;
* young generations are collected as usual (cheap: they hold only recent objects);
* the full collection runs on a timer, every --gc-full-interval seconds: one pause of
  the size above, at a known rate.
Checked against: CPython 3.11 (gc.freeze, gc.set_threshold).  Python 3.13's incremental
collector changes the trade-off; re-measure with bench/scale.py before relying on it there.
"""

import asyncio
import gc
import logging
import time
from typing import Optional

log = logging.getLogger("chatterd")

NEVER = 2**31 - 1  # a generation-2 threshold the count never reaches
DEFAULT_THRESHOLD = gc.get_threshold()  # Python's own, restored by stop()


class FullCollections:
    """Started once the app is built; `stop()` at shutdown."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._timer: Optional[asyncio.TimerHandle] = None
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, NEVER)
        if interval > 0:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.interval, self.collect)

    def collect(self) -> int:
        """One full collection now; returns the number of unreachable objects found."""
        started = time.perf_counter()
        found = gc.collect()
        log.debug("full garbage collection: %d unreachable objects, %.1f ms", found,
                  (time.perf_counter() - started) * 1000)
        if self._timer is not None:
            self._arm()
        return found

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.unfreeze()
        gc.set_threshold(*DEFAULT_THRESHOLD)

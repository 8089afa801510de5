"""Per-caller limits on the model endpoints: concurrent streams and requests per minute.

A caller is a user (their id) or, anonymous, a client address.  Both limits are counted in
the process (a request is refused before anything reaches PostgreSQL or a model); behind
nginx with several chatterd processes, a caller can have up to that many times the limits.
"""

import math
import time
from typing import Callable, Hashable, Optional


class Limited(Exception):
    """Over a limit: answer 429 with Retry-After: retry_after (whole seconds, at least 1)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = max(1, math.ceil(retry_after))


class CallerLimits:
    """`streams` concurrent streams and `rate` requests per minute per caller (0: no limit).

    The rate is a token bucket of `rate` requests refilled evenly over a minute: a burst of
    `rate` requests, then one every 60/rate seconds.
    """

    # Above this many tracked callers, those whose bucket is full again are forgotten.
    PRUNE_ABOVE = 10000

    def __init__(self, streams: int = 0, rate: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.streams = streams
        self.rate = rate
        self.clock = clock
        self.running: dict[Hashable, int] = {}
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # caller -> (tokens, at)

    @property
    def active(self) -> bool:
        return bool(self.streams or self.rate)

    def admit(self, caller: Hashable) -> Optional[Hashable]:
        """Take a request (and a stream slot) for *caller*, or raise Limited.  Returns the
        key to release() when the request ends (None when streams are not limited)."""
        if self.streams and self.running.get(caller, 0) >= self.streams:
            raise Limited(f"too many concurrent streams (at most {self.streams} per caller); "
                          "retry when one has ended", 1)
        if self.rate:
            self._take_token(caller)
        if not self.streams:
            return None
        self.running[caller] = self.running.get(caller, 0) + 1
        return caller

    def release(self, key: Optional[Hashable]) -> None:
        if key is None:
            return
        left = self.running.get(key, 0) - 1
        if left > 0:
            self.running[key] = left
        else:
            self.running.pop(key, None)

    def _take_token(self, caller: Hashable) -> None:
        now = self.clock()
        per_second = self.rate / 60.0
        tokens, at = self._buckets.get(caller, (float(self.rate), now))
        tokens = min(float(self.rate), tokens + (now - at) * per_second)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            raise Limited(f"too many requests (at most {self.rate} per minute per caller)",
                          (1.0 - tokens) / per_second)
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > self.PRUNE_ABOVE:
            self._prune(now, per_second)

    def _prune(self, now: float, per_second: float) -> None:
        full = [c for c, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * per_second >= self.rate]
        for caller in full:
            del self._buckets[caller]

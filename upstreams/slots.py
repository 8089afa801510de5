"""The queue of --max-streams upstream slots, shared by every upstream of the process."""

import asyncio
import collections

from upstreams.errors import UpstreamBusy


class Slots:
    """At most *size* Ollama requests at once; the others wait in order, for a bounded time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self.waiting: collections.deque[asyncio.Future] = collections.deque()

    async def take(self, timeout: float, aborted: asyncio.Future) -> bool:
        """Take a slot (True); False when *aborted* first; UpstreamBusy after *timeout* s."""
        if self.busy < self.size and not self.waiting:
            self.busy += 1
            return True
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        await asyncio.wait([turn, aborted], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if turn.done():
            return True  # handed over by give_back
        self.waiting.remove(turn)
        turn.cancel()
        if aborted.done():
            return False
        raise UpstreamBusy(f"all {self.size} upstream slots are busy; retry later")

    def give_back(self) -> None:
        if self.waiting:
            self.waiting.popleft().set_result(None)  # the slot passes straight to the next
        else:
            self.busy -= 1

"""A chat turn's upstream request sent while the turn begins (--early-upstream).

The model's first token then waits for begin_turn's round trip or the model, whichever
is slower, not both.  The request is built from the history turns/forecast.py forecasts; nothing
of its answer is relayed until the turn has begun (lease taken, not a resend) with exactly
that history (`settle`, from TurnKeeper.begin) and the handler is ready (`open`): until
then each chunk's lines are held, and the upstream read waits for them (back-pressure).
A request that is not confirmed is aborted at once (its --max-streams slot, or its place
in the queue for one, is given back) and nothing of it reaches the client, the stored
turn or the upstream error counts; the turn is then sent again the usual way.

    early = EarlyCall(handler.upstreams, body, handler._on_lines)
    turn = await keeper.begin(..., speculation=early)   # settles it
    if early.confirmed: early.open()  # the held lines go to handler._on_lines, in order
    else: early.drop()
"""

import asyncio
from typing import Any, Awaitable, Optional

import metrics
from upstreams.client import LinesCallback
from upstreams.errors import UpstreamAborted

REFUTED = "the early request was not confirmed by begin_turn"
# Sent with every early request: an upstream's logs (and tests/torture.py's audit) can tell
# them from the others, since a cancelled one may overlap another turn of its appID.
EARLY_HEADER = {"X-Chatterd-Early": "1"}


class EarlyCall:
    """One upstream call made before its turn began, and the gate on its lines."""

    __slots__ = ("history", "call", "confirmed", "opened", "dropped", "_relay", "_gate")

    def __init__(self, upstreams: Any, body: bytes, history: list[dict],
                 relay: Optional[LinesCallback]) -> None:
        self.history = history  # what the request sends (see turns.Speculation)
        self.confirmed: Optional[bool] = None  # None until settled
        self.opened = self.dropped = False
        self._relay = relay
        self._gate: Optional[asyncio.Future] = None  # made when lines wait for the gate
        self.call = upstreams.post("/api/chat", body, self._on_lines if relay else None,
                                   EARLY_HEADER)

    def settle(self, confirmed: bool) -> None:
        """begin_turn has answered (turns.Speculation); a refuted call is dropped now."""
        if self.confirmed is not None:
            return
        self.confirmed = confirmed
        metrics.EARLY_UPSTREAM.labels(outcome="confirmed" if confirmed else "cancelled").inc()
        if not confirmed:
            self.drop()

    def open(self) -> None:
        """The handler is ready for the answer: the lines held so far go to it, and the
        next ones straight."""
        self.opened = True
        if self._gate is not None and not self._gate.done():
            self._gate.set_result(True)

    def drop(self) -> None:
        """Abort the call: what it held is thrown away, and its slot given back."""
        if self.dropped:
            return
        self.dropped = True
        if self.confirmed is None:
            self.confirmed = False
            metrics.EARLY_UPSTREAM.labels(outcome="cancelled").inc()
        self.opened = False
        if self._gate is not None and not self._gate.done():
            self._gate.set_result(False)
        self._relay = None
        self.call.abort(UpstreamAborted(REFUTED))
        self.call.release()

    def _on_lines(self, lines: list[bytes]) -> Optional[Awaitable[None]]:
        if self.opened:
            return self._relay(lines)  # type: ignore[misc]
        if self.dropped:
            return None  # nothing of it goes anywhere
        return self._held(lines)

    async def _held(self, lines: list[bytes]) -> None:
        if self._gate is None:
            self._gate = asyncio.get_running_loop().create_future()
        if not await self._gate or self.dropped:
            return
        pending = self._relay(lines)
        if pending is not None:
            await pending


class EarlyUpstream:
    """Mixed into LLMChatHandler (whose slots hold `early`): the turn's upstream call sent
    while it begins, then either used (call_upstream) or dropped."""

    __slots__ = ()

    def send_early(self: Any, request: Any) -> None:
        """Send the turn upstream now when this process can forecast its history (see
        turns/forecast.py); begin() then settles it."""
        if not self.sends_early or self.client_gone:
            return
        keeper = self.application.turns
        _, budget = request.context_budget(self.config.context_tokens)
        history = keeper.forecasts.forecast(self.owner_id, request.app_id, request.messages, budget)
        if history is None:
            return
        self.early = EarlyCall(self.upstreams, request.upstream_body(history), history,
                               self._on_lines if request.stream else None)
        self.call = self.early.call  # a client that leaves aborts it, as any call

    def drop_early(self: Any) -> None:
        """The early call was not confirmed: it is aborted, and the turn is sent again."""
        early, self.early = self.early, None
        if self.call is early.call:  # type: ignore[union-attr]
            self.call = None
        early.drop()  # type: ignore[union-attr]

    def call_upstream(self: Any, request: Any, on_lines: Optional[LinesCallback]) -> None:
        """The turn's upstream call: the early one, now confirmed, or a new one."""
        early, self.early = self.early, None
        if early is not None:
            early.open()
            return
        self.start_call("/api/chat", request.upstream_body(self.turn.history), on_lines)

"""What makes a streamed turn resumable (handlers/chat.py mixes this in): its events
numbered and kept for a resume (resume/), X-Chatterd-Turn, X-Chatterd-Keep-Generating,
and stopping it from any process (POST /turns/<id>/stop, handlers/resume.py).

Without X-Chatterd-Keep-Generating a client that leaves stops its turn, as always.  With
it, the turn keeps generating (its events checkpointed, for a resume) until it ends, it
is stopped, or the window passes with no reader attached: then it is stopped and stored
interrupted.
"""

import asyncio
import logging
from typing import Any, Awaitable, Optional

from tornado.iostream import StreamClosedError

import sse
from db import events
from db.pool import DatabaseUnavailable
from handlers.validation import ClientError
from resume.record import BACKLOG
from upstreams.errors import UpstreamAborted

log = logging.getLogger("chatterd")

KEEP_HEADER = "X-Chatterd-Keep-Generating"
STOPPED = "the turn was stopped (POST /turns/{}/stop)"
WINDOW_OVER = "the client left and nobody resumed the stream within {:g} s"


class ResumableTurn:
    """Mixed into LLMChatHandler (whose slots hold `record`, `stopped`, `window_timer`)."""

    __slots__ = ()

    def keep_generating(self: Any) -> float:
        """The seconds X-Chatterd-Keep-Generating asks for (0: none); 400 if malformed."""
        header = self.request.headers.get(KEEP_HEADER)
        try:
            return self.application.resume.keep_seconds(header)
        except ValueError:
            raise ClientError(400, f"{KEEP_HEADER} must be a number of seconds, "
                                   f"not {header[:40]!r}") from None

    def start_record(self: Any, stream: bool, keep: float) -> None:
        """The turn has begun: name it, and number a stream's events from here on."""
        self.record, self.stopped, self.window_timer = None, False, None
        turn_id = self.turn.id
        if not turn_id:  # a stateless turn (/v1 without an appID): nothing to resume
            return
        self.set_header("X-Chatterd-Turn", str(turn_id))
        if stream:
            self.record = self.application.resume.record(turn_id, self.app_id, self.owner_id, keep)

    def open_record(self: Any) -> None:
        """The stream is committed (200): it can be resumed and stopped from now on."""
        record = self.record
        if record is not None and not record.opened:
            record.open()
            self.application.resume.running(record, self.stop_turn)

    def numbered(self: Any, framed: bytes, last: bool = False) -> bytes:
        """*framed* events with their ids, kept for a resume; *last*: they end the stream."""
        record = self.record
        if record is None:
            return framed
        self._numbering(record)
        return record.number(framed, last)

    def framed(self: Any, lines: list[bytes]) -> bytes:
        """numbered(self.frame(lines)); in one pass for plain data events (/llmchat)."""
        record = self.record
        if record is None or self.frame is not sse.data_events:
            return self.numbered(self.frame(lines))
        self._numbering(record)
        data = record.number_data(lines)
        return data if data is not None else record.number(self.frame(lines))

    def _numbering(self: Any, record: Any) -> None:
        if not record.opened:  # the first events open the stream
            self.open_record()
        if self.client_gone and record.detached:
            self.answer_started = True  # kept for a resume: this reply is the turn's

    def checkpointed(self: Any, pending: "Optional[Awaitable[None]]") -> "Optional[Awaitable[None]]":
        """*pending* (what the relay awaits before it reads on), or, when the turn has more
        unsaved events than BACKLOG, that and a checkpoint: a stream faster than the
        database is slowed to it instead of piling up in memory (not while the database is
        away: then the reply is held, as for storing it)."""
        record = self.record
        if record is None or record.unsaved_bytes <= BACKLOG:
            return pending
        checkpointer = self.application.resume.checkpointer
        if checkpointer.failing:
            return pending
        return self._checkpoint_then(pending, checkpointer, record)

    async def _checkpoint_then(self, pending: "Optional[Awaitable[None]]", checkpointer: Any,
                               record: Any) -> None:
        if pending is not None:
            await pending
        await checkpointer.sync(record)

    def stage_end(self: Any, framed: bytes, status: str) -> bytes:
        """*framed*, the terminal event the stream gets if the turn is stored as *status*,
        staged for a resume (resume/record.py, stage_end); returned for sending."""
        record = self.record
        if record is not None and record.opened:
            record.stage_end(framed, status)
        return framed

    def keeps_generating(self: Any) -> bool:
        """The client left: True when the turn goes on without it (see the module)."""
        record = getattr(self, "record", None)
        if record is None or record.keep <= 0 or not record.opened or record.final \
                or self.turn.ended or self.stopped:
            return False
        record.detach()
        self._arm_window(record.keep)
        return True

    def _arm_window(self: Any, delay: float) -> None:
        self.window_timer = asyncio.get_running_loop().call_later(
            delay, lambda: asyncio.ensure_future(self._window_over()))

    async def _window_over(self: Any) -> None:
        record = self.record
        self.window_timer = None
        if record is None or record.final or self.turn.ended:
            return
        try:  # a reader attached meanwhile (on any process) has pushed the end back
            stream = await events.stream_of(self.pool, record.owner, record.turn_id, 0)
        except DatabaseUnavailable:
            stream = None
        left = stream["keep_left"] if stream is not None else None
        if left is not None and left > 0.05 and not record.final:
            self._arm_window(left)
            return
        if self.call is not None and not record.final:
            self.call.abort(UpstreamAborted(WINDOW_OVER.format(record.keep)))

    def stop_turn(self: Any) -> None:
        """POST /turns/<id>/stop, from this process or another: end the turn now; what it
        has is stored interrupted."""
        if self.stopped or self.record is None or self.record.final:
            return
        self.stopped = True
        self.record.publish("stopped")  # its stopper waits for the end to be checkpointed
        if self.call is not None:
            self.call.abort(UpstreamAborted(STOPPED.format(self.record.turn_id)))

    async def close_record(self: Any, reason: str) -> None:
        """The turn is over: its stream ends (with an error event, *reason*, if it has not
        ended yet), and a stream a resume may need is checkpointed before the request ends."""
        record = getattr(self, "record", None)
        if record is None:
            return
        if self.window_timer is not None:
            self.window_timer.cancel()
            self.window_timer = None
        # The stream's end reached a client still connected: it has the whole stream.
        delivered = record.final and not self.client_gone
        if record.opened and not record.final:
            record.number(self.frame_error(reason), last=True)
        self.application.resume.ended(record, delivered)
        if not record.published:
            return
        events = getattr(self, "events", None)
        if events is not None and events.opened and not self._finished:
            # The client's response ends now, not after the checkpoint below (a graceful
            # shutdown writes what is left: Resumption.close).
            try:
                self.finish()
            except StreamClosedError:
                pass
        if not await self.application.resume.checkpointer.sync(record):
            log.warning("turn %d: the end of its stream could not be checkpointed", record.turn_id)

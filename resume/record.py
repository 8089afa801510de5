"""One streamed turn's events: numbered as they are framed, kept until checkpointed.

Every event of a turn's stream gets the SSE line `id: <turn id>:<n>`, n counting the
turn's events from 1.  The numbered bytes are exactly what the client is sent; the same
bytes are checkpointed (resume/checkpoint.py), so a resumed stream is byte for byte the
rest of the original.

A record is *published* (checkpointed from then on, everything so far first) only when a
resume may need it from the database: its client left, a reader asked for it (from any
process), it was stopped, or it holds more than BACKLOG bytes.  Until then its events stay
in this process's memory: a stream whose client is there to the end costs PostgreSQL
nothing (resume/__init__.py keeps it a while after, should its client come back).
"""

from typing import Any, Optional

import metrics
import sse

CHUNK_BYTES = 64 * 1024  # a stored chunk holds about this much (a reader's page is 8 of them)
# Unpublished bytes one record holds in memory; beyond them it is published, and its relay
# then waits for checkpoints (handlers/resumable.py): memory per stream stays bounded.
BACKLOG = 256 * 1024


class TurnRecord:
    """The events of one turn's stream not yet checkpointed, and where numbering is."""

    __slots__ = ("turn_id", "app_id", "owner", "_prefix", "n", "unsaved", "unsaved_last",
                 "unsaved_first", "unsaved_bytes", "final", "keep", "keep_seconds", "detached", "opened",
                 "_checkpointer", "saved_final", "end_status", "end_event", "row_due",
                 "published")

    def __init__(self, checkpointer: Any, turn_id: int, app_id: str, owner: int = 0,
                 keep: float = 0.0) -> None:
        self._checkpointer = checkpointer
        self.turn_id = turn_id
        self.app_id = app_id
        self.owner = owner
        self._prefix = b"id: %d:" % turn_id
        self.n = 0  # events numbered so far
        self.unsaved: list[bytes] = []  # numbered events not checkpointed yet, as written
        self.unsaved_last: list[int] = []  # the number of each one's last event
        self.unsaved_first = 1  # the number of unsaved[0]'s first event
        self.unsaved_bytes = 0
        self.final = False  # the terminal event is numbered
        self.saved_final = False  # ... and checkpointed
        self.keep = keep  # seconds the turn keeps generating once its client leaves (0: no)
        self.keep_seconds: Optional[float] = None  # to store with the next checkpoint
        self.detached = False
        self.opened = False
        # The terminal event staged for the next checkpoint (see stage_end), and its status.
        self.end_status: Optional[str] = None
        self.end_event: Optional[bytes] = None
        self.row_due = True  # the stream's row must be written (first, detached, end)
        self.published = False  # checkpointed to the database (see the module)

    def open(self) -> None:
        """The stream started (200 sent)."""
        self.opened = True

    def publish(self, reason: str) -> None:
        """Checkpoint this stream from now on, starting at once with everything so far
        (streams published together share the statement); *reason*: why (a metric label)."""
        if self.published or not self.opened:
            return
        metrics.STREAMS_WRITTEN.labels(reason=reason).inc()
        self.published = True
        self.row_due = True
        self._checkpointer.mark(self, at_once=True)

    def number(self, framed: bytes, last: bool = False) -> bytes:
        """*framed* (whole SSE events, each ending in a blank line) with each event's `id:`
        line; *last*: they end the stream.  Nothing more is numbered after the last."""
        if self.final or not framed:
            return framed
        data = sse.with_ids(framed, self._prefix, self.n)
        self.n += framed.count(b"\n\n")
        self._keep(data, last)
        return data

    def number_data(self, lines: list[bytes]) -> Optional[bytes]:
        """number(sse.data_events(lines)) in one pass, or None (then do that)."""
        if self.final:
            return None
        data = sse.data_events_with_ids(lines, self._prefix, self.n)
        if data is not None:
            self.n += len(lines)
            self._keep(data, False)
        return data

    def _keep(self, data: bytes, last: bool) -> None:
        self.unsaved.append(data)
        self.unsaved_last.append(self.n)
        self.unsaved_bytes += len(data)
        if last:
            self.final = self.row_due = True
        if self.published:
            self._checkpointer.mark(self, at_once=last or self.unsaved_bytes > self._checkpointer.max_bytes)
        elif self.unsaved_bytes > BACKLOG:
            self.publish("large")

    def stage_end(self, framed: bytes, status: str) -> None:
        """*framed*, the stream's terminal event if the turn is stored as *status*, written
        with the next checkpoint (started at once, ahead of storing the turn): should this
        process die after storing the turn but before checkpointing the end, a reader still
        ends the stream as the original would.  Numbered as number() will, not counted."""
        if self.final or not self.published:
            return
        self.end_status, self.end_event = status, sse.with_ids(framed, self._prefix, self.n)
        self.row_due = True
        self._checkpointer.mark(self, at_once=True)

    def detach(self) -> None:
        """The client left; the turn keeps generating for `keep` seconds: published, and
        that stored with the next checkpoint, made at once."""
        self.detached = True
        self.keep_seconds = self.keep
        self.row_due = True
        if self.published:
            self._checkpointer.mark(self, at_once=True)
        else:
            self.publish("client_left")

    def take(self) -> tuple:
        """(stream row or None, chunks) for a checkpoint, the chunks about CHUNK_BYTES each;
        put back with untake() if it fails."""
        chunks = []
        first, parts, size = self.unsaved_first, [], 0
        for data, last in zip(self.unsaved, self.unsaved_last):
            parts.append(data)
            size += len(data)
            if size >= CHUNK_BYTES or last == self.n:
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                chunks.append((self.owner, self.turn_id, first, last,
                               self.final and last == self.n, body))
                first, parts, size = last + 1, [], 0
        self.unsaved_first = self.n + 1
        self.unsaved, self.unsaved_last, self.unsaved_bytes = [], [], 0
        stream = None
        if self.row_due:
            stream = (self.owner, self.turn_id, self.app_id, self.final and bool(chunks),
                      self.keep_seconds, self.detached, self.end_status, self.end_event)
            self.keep_seconds = None
            self.end_status = self.end_event = None
            self.row_due = False
        return stream, chunks

    def untake(self, taken: tuple) -> None:
        stream, chunks = taken
        if stream is not None:
            self.row_due = True
            if stream[4] is not None and self.keep_seconds is None:
                self.keep_seconds = stream[4]
            if stream[6] is not None and self.end_status is None:
                self.end_status, self.end_event = stream[6], stream[7]
        if chunks:
            self.unsaved[:0] = [c[5] for c in chunks]
            self.unsaved_last[:0] = [c[3] for c in chunks]
            self.unsaved_bytes += sum(len(c[5]) for c in chunks)
            self.unsaved_first = chunks[0][2]

    def saved(self, taken: tuple) -> None:
        if any(c[4] for c in taken[1]):
            self.saved_final = True

    @property
    def dirty(self) -> bool:
        return bool(self.unsaved) or self.row_due

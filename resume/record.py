"""One streamed turn's events: numbered as they are framed, kept until checkpointed.

Every event of a turn's stream gets the SSE line `id: <turn id>:<n>`, n counting the
turn's events from 1.  The numbered bytes are exactly what the client is sent; the same
bytes are checkpointed (resume/checkpoint.py), so a resumed stream is byte for byte the
rest of the original.
"""

from typing import Any, Optional

import sse


class TurnRecord:
    """The events of one turn's stream not yet checkpointed, and where numbering is."""

    __slots__ = ("turn_id", "app_id", "owner", "_prefix", "n", "unsaved", "unsaved_first",
                 "unsaved_bytes", "final", "keep", "keep_seconds", "detached", "opened",
                 "_checkpointer", "saved_final")

    def __init__(self, checkpointer: Any, turn_id: int, app_id: str, owner: int = 0,
                 keep: float = 0.0) -> None:
        self._checkpointer = checkpointer
        self.turn_id = turn_id
        self.app_id = app_id
        self.owner = owner
        self._prefix = b"id: %d:" % turn_id
        self.n = 0  # events numbered so far
        self.unsaved: list[bytes] = []  # numbered events not checkpointed yet
        self.unsaved_first = 1  # the number of unsaved[0]'s first event
        self.unsaved_bytes = 0
        self.final = False  # the terminal event is numbered
        self.saved_final = False  # ... and checkpointed
        self.keep = keep  # seconds the turn keeps generating once its client leaves (0: no)
        self.keep_seconds: Optional[float] = None  # to store with the next checkpoint
        self.detached = False
        self.opened = False

    def open(self) -> None:
        """The stream started (200 sent): its row is written at once, so a resume that
        comes right after the first event finds it."""
        self.opened = True
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
        self.unsaved_bytes += len(data)
        if last:
            self.final = True
        self._checkpointer.mark(self, at_once=last or self.unsaved_bytes > self._checkpointer.max_bytes)

    def detach(self) -> None:
        """The client left; the turn keeps generating for `keep` seconds (stored with the
        next checkpoint, made at once)."""
        self.detached = True
        self.keep_seconds = self.keep
        self._checkpointer.mark(self, at_once=True)

    def take(self) -> tuple:
        """(stream row, chunk or None) for a checkpoint; put back with untake() if it fails."""
        chunk = None
        if self.unsaved:
            body = self.unsaved[0] if len(self.unsaved) == 1 else b"".join(self.unsaved)
            chunk = (self.owner, self.turn_id, self.unsaved_first, self.n, self.final, body)
            self.unsaved_first = self.n + 1
            self.unsaved, self.unsaved_bytes = [], 0
        stream = (self.owner, self.turn_id, self.app_id, self.n,
                  self.final and chunk is not None, self.keep_seconds, self.detached)
        self.keep_seconds = None
        return stream, chunk

    def untake(self, taken: tuple) -> None:
        stream, chunk = taken
        if stream[5] is not None and self.keep_seconds is None:
            self.keep_seconds = stream[5]
        if chunk is not None:
            self.unsaved.insert(0, chunk[5])
            self.unsaved_bytes += len(chunk[5])
            self.unsaved_first = chunk[2]

    def saved(self, taken: tuple) -> None:
        if taken[1] is not None and taken[1][4]:
            self.saved_final = True

    @property
    def dirty(self) -> bool:
        return bool(self.unsaved) or self.keep_seconds is not None

"""A resumed stream: a turn's events after a given one, read from PostgreSQL a page at a
time (stored part), then as they are checkpointed (live part), until the terminal event.

Exactly once: events are cut at their numbers, never at bytes, and each chunk is read
once, so a reader sends event n+1 right after n and never one twice.  A turn whose
process died (its lease expired while it still ran) ends with an error event, so a
reader never waits forever.
"""

import asyncio
import re
from typing import AsyncIterator, Optional

import jsonfmt
from db import events
from resume import Resumption

PAGE = 8  # chunks per read: a chunk holds at most about 64 KiB of events (resume/record.py)
POLL = 1.0  # seconds between looks at the table when no notification comes
LAST_EVENT_ID = re.compile(r"(\d{1,18}):(\d{1,9})")

DIED = "the chatterd process generating this turn stopped before it ended; the turn is abandoned"
# Its process died between storing the turn and checkpointing the stream's last events (a
# window of one statement): the reply is stored whole, and a resend of the turn gets it.
LOST_END = ("the turn ended and is stored, but the end of its stream was lost with its "
            "chatterd process; send the turn again to get the stored answer")


class BadEventId(ValueError):
    pass


def parse_last_event_id(value: Optional[str], turn_id: int) -> int:
    """The event number a Last-Event-ID names (0: from the start, when there is none);
    BadEventId when it is malformed or names another turn's event."""
    if value is None or value == "":
        return 0
    m = LAST_EVENT_ID.fullmatch(value.strip())
    if m is None:
        raise BadEventId(f"Last-Event-ID {value[:40]!r} is not of the form <turn id>:<n>")
    if int(m.group(1)) != turn_id:
        raise BadEventId(f"Last-Event-ID {value[:40]!r} names an event of another turn, "
                         f"not of turn {turn_id}")
    return int(m.group(2))


def events_after(body: bytes, first_n: int, after: int) -> bytes:
    """The events of a chunk (events first_n.. of its turn) numbered above *after*."""
    if first_n > after:
        return body
    pos = 0
    for _ in range(after - first_n + 1):
        pos = body.index(b"\n\n", pos) + 2
    return body[pos:]


def error_event(turn_id: int, n: int, message: str) -> bytes:
    return b"id: %d:%d\nevent: error\ndata: %s\n\n" % (turn_id, n, jsonfmt.dumpb({"error": message}))


async def read(resume: Resumption, owner_id: int, turn_id: int, after: int,
               left: "asyncio.Future[object]") -> AsyncIterator[bytes]:
    """Yield the events of *owner_id*'s turn after number *after*, in order, up to and with
    its terminal event; stops early when *left* is done (the client went away)."""
    pool = resume.pool
    sent = after
    next_keep = 0.0
    loop = asyncio.get_running_loop()
    resume.hub.ensure()
    quiet_unleased = 0
    while True:
        rows = await events.chunks_after(pool, owner_id, turn_id, sent, PAGE)
        for row in rows:
            data = events_after(row["body"], row["first_n"], sent)
            sent = row["last_n"]
            if data:
                yield data
            if row["final"]:
                return
        if len(rows) == PAGE:
            continue  # more stored
        if rows:
            quiet_unleased = 0
        if left.done():
            return
        # Live: while a reader is here, a turn whose client left keeps generating.
        if resume.window > 0 and loop.time() >= next_keep:
            await events.extend_keep(pool, owner_id, turn_id, resume.window)
            next_keep = loop.time() + resume.window / 3
        if await resume.hub.wait(turn_id, POLL, left):
            continue
        if left.done():
            return
        state = await events.turn_state(pool, owner_id, turn_id)
        if state is not None and state["leased"]:
            quiet_unleased = 0
            continue
        # Not running any more and no terminal event stored.  A turn that still says
        # running lost its process; one that ended gets a moment for its last checkpoint.
        quiet_unleased += 1
        if state is None or state["status"] in ("running", "abandoned") or quiet_unleased > 2:
            rows = await events.chunks_after(pool, owner_id, turn_id, sent, PAGE)
            if rows:
                continue
            if state is None or state["status"] in ("running", "abandoned"):
                yield error_event(turn_id, sent + 1, DIED)
                return
            # Stored, but its process died before checkpointing the end: the end staged
            # for that status, if every event before it was checkpointed.
            staged = await events.staged_end(pool, owner_id, turn_id)
            if staged is not None and staged["end_status"] == state["status"] \
                    and staged["last_n"] == sent and staged["end_event"] is not None \
                    and staged["end_event"].startswith(b"id: %d:%d\n" % (turn_id, sent + 1)):
                yield staged["end_event"]
            else:
                yield error_event(turn_id, sent + 1, LOST_END)
            return

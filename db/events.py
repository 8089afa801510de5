"""SQL for resumable streams: a turn's SSE events, checkpointed and read back in pages.

The tables are db/migrations/0030_turn_events.sql.  A process writes all of its running
turns' new events in one statement per checkpoint (write_checkpoint), which also wakes,
through NOTIFY, every process with a reader of those turns (resume/hub.py).  Readers
fetch chunks a page at a time (chunks_after), never a whole reply.
"""

from typing import Any, Optional

import asyncpg

from db.pool import connection

EVENTS_CHANNEL = "chatterd_turn_events"  # payload: turn ids with new events, comma-separated
STOP_CHANNEL = "chatterd_turn_stop"  # payload: the id of a turn to stop
PUBLISH_CHANNEL = "chatterd_turn_publish"  # payload: the id of a turn a reader asks for
NOTIFY_MAX = 7000  # bytes per NOTIFY payload (PostgreSQL's limit is 8000)

# One statement per checkpoint: the streams' rows (created by their first checkpoint),
# their new chunks, and one NOTIFY per few hundred turns.  Its commit does not wait for the
# WAL flush: a checkpoint lost with a crash of PostgreSQL itself loses the turn's resume,
# never its stored reply.
WRITE_CHECKPOINT = """
WITH s AS (
    INSERT INTO turn_streams AS s (owner_id, turn_id, appid, finished_at, keep_until,
                                   detached, end_status, end_event)
    SELECT u.o, u.t, u.a, CASE WHEN u.f THEN clock_timestamp() END,
           clock_timestamp() + make_interval(secs => u.k), coalesce(u.d, false), u.es, u.ee
      FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::boolean[],
                  $5::double precision[], $6::boolean[], $7::text[], $8::bytea[])
           AS u(o, t, a, f, k, d, es, ee)
    ON CONFLICT (owner_id, turn_id) DO UPDATE
       SET finished_at = coalesce(s.finished_at, EXCLUDED.finished_at),
           keep_until = greatest(s.keep_until, EXCLUDED.keep_until),
           detached = s.detached OR EXCLUDED.detached,
           end_status = coalesce(EXCLUDED.end_status, s.end_status),
           end_event = coalesce(EXCLUDED.end_event, s.end_event)
), c AS (
    -- A checkpoint retried after a failure whose commit went through anyway holds the same
    -- events from the same first one, and maybe more: it replaces the row it repeats.
    INSERT INTO turn_event_chunks AS c (owner_id, turn_id, first_n, last_n, final, body)
    SELECT * FROM unnest($9::bigint[], $10::bigint[], $11::integer[], $12::integer[],
                         $13::boolean[], $14::bytea[])
    ON CONFLICT (owner_id, turn_id, first_n) DO UPDATE
       SET last_n = EXCLUDED.last_n, final = EXCLUDED.final, body = EXCLUDED.body
       WHERE EXCLUDED.last_n > c.last_n
)
SELECT set_config('synchronous_commit', 'off', true),
       (SELECT count(pg_notify('""" + EVENTS_CHANNEL + """', p)) FROM unnest($15::text[]) p)
"""


def notify_payloads(turn_ids: list[int]) -> list[str]:
    """*turn_ids* as comma-separated payloads, each within NOTIFY_MAX bytes."""
    payloads, part, size = [], [], 0
    for t in turn_ids:
        text = str(t)
        if part and size + len(text) + 1 > NOTIFY_MAX:
            payloads.append(",".join(part))
            part, size = [], 0
        part.append(text)
        size += len(text) + 1
    if part:
        payloads.append(",".join(part))
    return payloads


async def write_checkpoint(pool: asyncpg.Pool, streams: list[tuple], chunks: list[tuple]) -> None:
    """Store *chunks* (owner_id, turn_id, first_n, last_n, final, body) and upsert *streams*
    (owner_id, turn_id, appid, finished, keep_seconds or None, detached, end_status or None,
    end_event or None), then notify readers of those turns; one round trip.  A
    stream's row is written when something about it changes (its start, its client leaving,
    its end), not with every chunk: the newest chunk says how far it is."""
    s = list(zip(*streams)) if streams else [()] * 8
    c = list(zip(*chunks)) if chunks else [()] * 6
    turns = {row[1] for row in streams} | {row[1] for row in chunks}
    async with connection(pool, "checkpoint") as con:
        await con.execute(WRITE_CHECKPOINT, *[list(col) for col in s], *[list(col) for col in c],
                          notify_payloads(sorted(turns)))


async def stream_of(pool: asyncpg.Pool, owner_id: int, turn_id: int,
                    retention: float) -> Optional[asyncpg.Record]:
    """The stream row of *owner_id*'s turn: appid, last_n, finished, expired (finished more
    than *retention* seconds ago), detached, keep_left (seconds, or None); None if there is
    none, or its turn is gone (its conversation was deleted)."""
    async with connection(pool, "turn_stream") as con:
        return await con.fetchrow(
            "SELECT s.appid, s.finished_at IS NOT NULL AS finished,"
            " coalesce((SELECT c.last_n FROM turn_event_chunks c WHERE c.owner_id = s.owner_id"
            " AND c.turn_id = s.turn_id ORDER BY c.first_n DESC LIMIT 1), 0) AS last_n,"
            " coalesce(s.finished_at < clock_timestamp() - make_interval(secs => $3), false)"
            " AS expired, s.detached,"
            " extract(epoch FROM s.keep_until - clock_timestamp())::float8 AS keep_left"
            " FROM turn_streams s JOIN turns t ON t.owner_id = s.owner_id AND t.id = s.turn_id"
            " WHERE s.owner_id = $1 AND s.turn_id = $2", owner_id, turn_id, retention)


async def turn_state(pool: asyncpg.Pool, owner_id: int, turn_id: int,
                     recent: float = 10.0) -> Optional[asyncpg.Record]:
    """The turn's appid and status, whether a process holds its lease now, and whether it
    is running or ended less than *recent* seconds ago; None if no such turn."""
    async with connection(pool, "turn_state") as con:
        return await con.fetchrow(
            "SELECT t.appid, t.status, EXISTS (SELECT 1 FROM leases l"
            " WHERE l.owner_id = t.owner_id AND l.appid = t.appid AND l.turn_id = t.id"
            " AND l.expires_at > clock_timestamp()) AS leased,"
            " coalesce(t.ended_at > clock_timestamp() - make_interval(secs => $3), true) AS recent"
            " FROM turns t WHERE t.owner_id = $1 AND t.id = $2", owner_id, turn_id, recent)


async def chunks_after(pool: asyncpg.Pool, owner_id: int, turn_id: int, after: int,
                       limit: int) -> list[asyncpg.Record]:
    """Up to *limit* chunks holding events after number *after*, in order; and the final
    chunk when *after* is the terminal event (nothing follows it: the reader is done)."""
    async with connection(pool, "turn_events") as con:
        return await con.fetch(
            "SELECT first_n, last_n, final, body FROM turn_event_chunks"
            " WHERE owner_id = $1 AND turn_id = $2 AND (last_n > $3 OR (last_n = $3 AND final))"
            " ORDER BY first_n LIMIT $4", owner_id, turn_id, after, limit)


async def staged_end(pool: asyncpg.Pool, owner_id: int, turn_id: int) -> Optional[asyncpg.Record]:
    """The turn's staged terminal event (end_status, end_event) and last_n."""
    async with connection(pool, "turn_staged_end") as con:
        return await con.fetchrow(
            "SELECT s.end_status, s.end_event,"
            " coalesce((SELECT c.last_n FROM turn_event_chunks c WHERE c.owner_id = s.owner_id"
            " AND c.turn_id = s.turn_id ORDER BY c.first_n DESC LIMIT 1), 0) AS last_n"
            " FROM turn_streams s WHERE s.owner_id = $1 AND s.turn_id = $2", owner_id, turn_id)


async def extend_keep(pool: asyncpg.Pool, owner_id: int, turn_id: int, seconds: float) -> None:
    """A reader is attached: a detached turn keeps generating at least *seconds* more."""
    async with connection(pool, "turn_keep") as con:
        await con.execute(
            "UPDATE turn_streams SET keep_until = clock_timestamp() + make_interval(secs => $3)"
            " WHERE owner_id = $1 AND turn_id = $2"
            " AND keep_until < clock_timestamp() + make_interval(secs => $3)",
            owner_id, turn_id, seconds)


async def detached_turn(pool: asyncpg.Pool, owner_id: int, app_id: str, turn_id: int) -> bool:
    """Whether the running turn *turn_id* of (*owner_id*, *app_id*) has lost the client that
    started it."""
    async with connection(pool, "turn_detached") as con:
        return bool(await con.fetchval(
            "SELECT detached AND finished_at IS NULL FROM turn_streams"
            " WHERE owner_id = $1 AND turn_id = $2 AND appid = $3", owner_id, turn_id, app_id))


async def notify_stop(pool: asyncpg.Pool, turn_id: int) -> None:
    async with connection(pool, "turn_stop") as con:
        await con.execute(f"SELECT pg_notify('{STOP_CHANNEL}', $1::text)", str(turn_id))


async def notify_publish(pool: asyncpg.Pool, turn_id: int) -> None:
    async with connection(pool, "turn_publish") as con:
        await con.execute(f"SELECT pg_notify('{PUBLISH_CHANNEL}', $1::text)", str(turn_id))


async def purge(pool: asyncpg.Pool, retention: float, forget_after: float) -> int:
    """Delete the events of streams finished more than *retention* seconds ago, and of
    streams never finished (their process died) started more than *forget_after* seconds
    ago; stream rows go after *forget_after* (until then a resume gets 410, not 404)."""
    async with connection(pool, "turn_events_purge") as con:
        async with con.transaction():
            deleted = await con.execute(
                "DELETE FROM turn_event_chunks c USING turn_streams s"
                " WHERE c.owner_id = s.owner_id AND c.turn_id = s.turn_id"
                " AND (s.finished_at < clock_timestamp() - make_interval(secs => $1)"
                "      OR (s.finished_at IS NULL"
                "          AND s.started_at < clock_timestamp() - make_interval(secs => $2)))",
                retention, forget_after)
            await con.execute(
                "DELETE FROM turn_streams WHERE coalesce(finished_at, started_at)"
                " < clock_timestamp() - make_interval(secs => $1)", retention + forget_after)
    return int(deleted.split()[-1])


async def listen_connection(pool: asyncpg.Pool) -> Any:
    """A connection of its own (not the pool's: it stays open, LISTENing), made with the
    pool's settings."""
    return await asyncpg.connect(*pool._connect_args, **pool._connect_kwargs)

-- Resumable streams (docs/api.md, "Resuming a stream"): the events of a turn's SSE stream,
-- kept so a client that lost its connection can fetch the rest from any chatterd process.
-- Keyed, like every row of a conversation, by its owner first (0021): a turn's events are
-- read with its owner and appID, never by turn id alone.
--
-- turn_streams: one row per streamed turn, written with its first checkpoint (and again
-- only when its client leaves and when it ends: how far it is, its newest chunk says).
-- appid says whose conversation it is; finished_at is set with the stream's terminal event
-- (the final line or an error), and retention counts from it.
-- keep_until: how long a turn whose client left keeps generating (a reader extends it while
-- attached); detached: the client that started it has left.  end_event: the stream's
-- terminal event, staged just before the turn is stored, for the status end_status: a reader
-- sends it only if the turn was stored with that status and its process died before
-- checkpointing the end (otherwise the checkpointed terminal event is the one).
CREATE TABLE turn_streams (
    owner_id    bigint NOT NULL,
    turn_id     bigint NOT NULL,
    appid       text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    keep_until  timestamptz,
    detached    boolean NOT NULL DEFAULT false,
    end_status  text,
    end_event   bytea,
    PRIMARY KEY (owner_id, turn_id)
);
CREATE INDEX turn_streams_finished ON turn_streams (finished_at);
CREATE INDEX turn_streams_started ON turn_streams (started_at) WHERE finished_at IS NULL;

-- turn_event_chunks: the events first_n..last_n of a turn, as sent (each with its `id:`
-- line), up to about 64 KiB a row: a process writes every running turn's new events in one
-- statement every --resume-checkpoint seconds, never a row per token.  final: the chunk
-- ends with the stream's terminal event.
CREATE TABLE turn_event_chunks (
    owner_id bigint NOT NULL,
    turn_id  bigint NOT NULL,
    first_n  integer NOT NULL,
    last_n   integer NOT NULL,
    final    boolean NOT NULL DEFAULT false,
    body     bytea NOT NULL,
    PRIMARY KEY (owner_id, turn_id, first_n)
);

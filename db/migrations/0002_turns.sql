-- A turn is one unit: its incoming messages and its reply enter the conversation together,
-- when the turn ends, in one transaction.  Until then they are stored but pending.
-- (db/functions/begin_turn.sql and end_turn.sql start and end turns.)

CREATE SEQUENCE turn_ids;

CREATE TABLE turns (
    id         bigint PRIMARY KEY DEFAULT nextval('turn_ids'),  -- also the conversation order
    appid      text NOT NULL,
    status     text NOT NULL DEFAULT 'running'
               CHECK (status IN ('running',      -- pending: not part of the conversation yet
                                 'complete', 'interrupted', 'failed',  -- ended: part of it
                                 'rejected',     -- ended before its answer started: never part
                                 'abandoned')),  -- its process died or lost the lease: never part
    owner      text,               -- the chatterd process that ran it
    error      text,               -- why it is not complete
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz
);
ALTER SEQUENCE turn_ids OWNED BY turns.id;
CREATE INDEX turns_appid ON turns (appid, id);
CREATE INDEX turns_running ON turns (appid) WHERE status = 'running';

-- One turn at a time per appID, across processes: a lease renewed by its process while the
-- turn runs.  A killed process stops renewing, and the next turn takes the lease over.
CREATE TABLE leases (
    appid      text PRIMARY KEY,
    turn_id    bigint NOT NULL,
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX leases_owner ON leases (owner);

-- Messages stored before this migration become one ended turn per appID, in their order.
ALTER TABLE messages ADD COLUMN turn_id bigint;
INSERT INTO turns (appid, status, ended_at) SELECT DISTINCT appid, 'complete', now() FROM messages;
UPDATE messages m SET turn_id = t.id FROM turns t WHERE t.appid = m.appid;
ALTER TABLE messages ALTER COLUMN turn_id SET NOT NULL,
    ADD CONSTRAINT messages_turn FOREIGN KEY (turn_id) REFERENCES turns (id) ON DELETE CASCADE;
CREATE INDEX messages_turn_seq ON messages (turn_id, seq);

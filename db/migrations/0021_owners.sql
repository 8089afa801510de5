-- Conversations belong to someone.  owner_id is the user's id (db/migrations/0020_accounts.sql),
-- or 0 for the anonymous namespace, where every request without credentials acts: every
-- conversation stored before this migration stays there, under the same appID, and nothing
-- is re-keyed.  The same appID under two owners is two conversations.  Every key and index
-- of a conversation's rows leads with (owner_id, appid) and every function in db/functions/
-- takes the owner and names it in each statement, so no query reaches a row of another
-- owner's conversation: the owner is part of the key, not a check that could be left out.
-- (The `owner` columns of turns and leases name the chatterd process running a turn, as
-- before; owner_id names the person.)

ALTER TABLE turns ADD COLUMN owner_id bigint NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN owner_id bigint NOT NULL DEFAULT 0;
ALTER TABLE leases ADD COLUMN owner_id bigint NOT NULL DEFAULT 0;
ALTER TABLE tool_schemas ADD COLUMN owner_id bigint NOT NULL DEFAULT 0;
ALTER TABLE conversation_sizes ADD COLUMN owner_id bigint NOT NULL DEFAULT 0;

-- A turn is found by its owner and id, and a message belongs to a turn of its own owner:
-- the foreign key says so, so a message can never hang under another owner's turn.
ALTER TABLE messages DROP CONSTRAINT messages_turn;
ALTER TABLE turns DROP CONSTRAINT turns_pkey;
ALTER TABLE turns ADD CONSTRAINT turns_pkey PRIMARY KEY (owner_id, id);
DROP INDEX messages_turn_seq;
CREATE INDEX messages_turn_seq ON messages (owner_id, turn_id, seq);
ALTER TABLE messages ADD CONSTRAINT messages_turn FOREIGN KEY (owner_id, turn_id)
    REFERENCES turns (owner_id, id) ON DELETE CASCADE;

DROP INDEX turns_appid;
CREATE INDEX turns_appid ON turns (owner_id, appid, id);
DROP INDEX turns_running;
CREATE INDEX turns_running ON turns (owner_id, appid) WHERE status = 'running';
DROP INDEX messages_appid_seq;
CREATE INDEX messages_appid_seq ON messages (owner_id, appid, seq);
DROP INDEX messages_system;
CREATE INDEX messages_system ON messages (owner_id, appid, turn_id, seq) WHERE role = 'system';

ALTER TABLE leases DROP CONSTRAINT leases_pkey;
ALTER TABLE leases ADD CONSTRAINT leases_pkey PRIMARY KEY (owner_id, appid);
ALTER TABLE tool_schemas DROP CONSTRAINT tool_schemas_pkey;
ALTER TABLE tool_schemas ADD CONSTRAINT tool_schemas_pkey PRIMARY KEY (owner_id, appid);

-- A conversation's row (kept by begin_turn and end_turn since 0005 for its size) also holds
-- what GET /conversations lists: the title its owner gave it (PATCH), the model of its
-- latest reply and when a turn last entered it.  No index on updated_at: end_turn changes
-- it at every turn, and an index on it would cost every turn an index write (no HOT
-- update); an owner's list is read through the key and sorted.
ALTER TABLE conversation_sizes DROP CONSTRAINT conversation_sizes_pkey;
ALTER TABLE conversation_sizes ADD CONSTRAINT conversation_sizes_pkey PRIMARY KEY (owner_id, appid);
ALTER TABLE conversation_sizes
    ADD COLUMN title text CHECK (char_length(title) <= 200),
    ADD COLUMN model text,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
UPDATE conversation_sizes s
   SET updated_at = coalesce((SELECT max(t.ended_at) FROM turns t
                               WHERE t.owner_id = s.owner_id AND t.appid = s.appid
                                 AND t.status IN ('complete', 'interrupted', 'failed')),
                             s.updated_at),
       model = (SELECT m.model FROM messages m
                 WHERE m.owner_id = s.owner_id AND m.appid = s.appid AND m.model IS NOT NULL
                 ORDER BY m.seq DESC LIMIT 1);

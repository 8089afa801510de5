-- The owner stays part of every key, but second: each index of turns, messages and leases
-- leads with the column that picks a conversation or a turn (appid, turn id), then owner_id.
--
-- Why: with owner_id first in every index, every index matched every statement by its
-- owner, and when the planner could not tell them apart it chose one that matched on the
-- owner alone.  That happens whenever the statistics do not say better: a new database, and
-- a connection's cached plans, which PL/pgSQL makes once (after a statement's first five
-- runs) and keeps until the table is next analyzed.  end_turn's reads of a turn's messages
-- (owner_id, turn_id) then ran on messages_appid_seq with `owner_id = $1` as the only index
-- condition: every message of the owner, which for the anonymous namespace (owner 0) is
-- every message stored, in three statements of every turn (bench/turn_cost.py --no-analyze).  With the
-- selective column first, an index is a candidate only for the statements that name that
-- column, as before owners: a lookup by turn id can only use the indexes that start with the
-- turn id.  conversation_sizes and tool_schemas keep (owner_id, appid): their key is their
-- only index, and an owner's list of conversations (GET /conversations) reads it by owner.
-- Deleting an owner's rows whole (an account deleted, db/functions/delete_owner.sql) reads
-- turns and leases whole: rare, and an index of the owner alone would bring the ambiguity back.
--
-- The foreign key from messages to turns is (owner_id, turn_id) -> (owner_id, id) as before;
-- the order of a key's columns does not change what it references, nor ON CONFLICT's
-- arbiter (begin_turn's upsert of leases still names (owner_id, appid)).

ALTER TABLE messages DROP CONSTRAINT messages_turn;
ALTER TABLE turns DROP CONSTRAINT turns_pkey;
ALTER TABLE turns ADD CONSTRAINT turns_pkey PRIMARY KEY (id, owner_id);
DROP INDEX messages_turn_seq;
CREATE INDEX messages_turn_seq ON messages (turn_id, owner_id, seq);
ALTER TABLE messages ADD CONSTRAINT messages_turn FOREIGN KEY (owner_id, turn_id)
    REFERENCES turns (owner_id, id) ON DELETE CASCADE;

DROP INDEX turns_appid;
CREATE INDEX turns_appid ON turns (appid, owner_id, id);
DROP INDEX turns_running;
CREATE INDEX turns_running ON turns (appid, owner_id) WHERE status = 'running';
DROP INDEX messages_appid_seq;
CREATE INDEX messages_appid_seq ON messages (appid, owner_id, seq);
DROP INDEX messages_system;
CREATE INDEX messages_system ON messages (appid, owner_id, turn_id, seq) WHERE role = 'system';

ALTER TABLE leases DROP CONSTRAINT leases_pkey;
ALTER TABLE leases ADD CONSTRAINT leases_pkey PRIMARY KEY (appid, owner_id);

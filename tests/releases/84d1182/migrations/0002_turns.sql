-- A turn is one unit: its incoming messages and its reply enter the conversation together,
-- when the turn ends, in one transaction.  Until then they are stored but pending.

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

-- The conversation of an appID as Ollama messages: ended turns only, system prompts first,
-- then turn by turn in order.  A reply that ended with neither text nor tool calls is left
-- out: it would only show the model an empty assistant message.
CREATE FUNCTION conversation_of(p_appid text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('role', m.role, 'content', m.content)
                              || coalesce(m.extra, '{}'::jsonb)
                              ORDER BY m.role <> 'system', m.turn_id, m.seq), '[]'::jsonb)
    FROM messages m JOIN turns t ON t.id = m.turn_id
    WHERE m.appid = p_appid AND t.appid = p_appid
      AND t.status IN ('complete', 'interrupted', 'failed')
      AND (m.status = 'complete' OR m.content <> '' OR m.extra ? 'tool_calls')
$$;

-- Start a turn: take the appID's lease (unless another live turn holds it), store the
-- incoming messages as pending, and return the turn id with the conversation so far, in
-- one round trip.  Returns no row when the appID is busy.  A turn whose lease expired
-- (its process is gone) is marked abandoned here.  With p_replace (llmprep), the
-- appID's earlier turns are forgotten.
CREATE FUNCTION begin_turn(p_appid text, p_owner text, p_lease_seconds double precision,
                           p_messages jsonb, p_replace boolean DEFAULT false)
RETURNS TABLE (turn_id bigint, history jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_turn bigint := nextval('turn_ids');
BEGIN
    INSERT INTO leases AS l (appid, turn_id, owner, expires_at)
    VALUES (p_appid, v_turn, p_owner, clock_timestamp() + make_interval(secs => p_lease_seconds))
    ON CONFLICT (appid) DO UPDATE
        SET turn_id = EXCLUDED.turn_id, owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
        WHERE l.expires_at <= clock_timestamp();
    IF NOT FOUND THEN
        RETURN;  -- busy
    END IF;
    UPDATE turns SET status = 'abandoned', ended_at = now(),
                     error = 'its chatterd process stopped before the turn ended'
     WHERE appid = p_appid AND status = 'running';
    IF p_replace THEN
        DELETE FROM turns WHERE appid = p_appid;  -- messages go with them (cascade)
    END IF;
    INSERT INTO turns (id, appid, owner) VALUES (v_turn, p_appid, p_owner);
    INSERT INTO messages (appid, turn_id, role, content, extra)
    SELECT p_appid, v_turn, e.m->>'role', e.m->>'content', nullif(e.m->'extra', 'null'::jsonb)
      FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i)
     ORDER BY e.i;
    RETURN QUERY SELECT v_turn, CASE WHEN p_replace THEN '[]'::jsonb ELSE conversation_of(p_appid) END;
END
$$;

-- End a turn in one transaction: its status, its reply (if any), the lease released.
-- Idempotent, so a retry after an ambiguous failure never stores the reply twice:
-- 'stored' = done now, 'already' = an earlier attempt did it, 'lost' = the turn was
-- abandoned meanwhile (its lease expired and another turn took it).
CREATE FUNCTION end_turn(p_turn bigint, p_status text, p_error text, p_content text,
                         p_extra jsonb, p_model text, p_tokens integer, p_reply boolean)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_appid text;
BEGIN
    SELECT status, appid INTO v_status, v_appid FROM turns WHERE id = p_turn FOR UPDATE;
    IF v_status IS NULL THEN
        RETURN 'lost';
    ELSIF v_status <> 'running' THEN
        RETURN CASE WHEN v_status = p_status THEN 'already' ELSE 'lost' END;
    END IF;
    UPDATE turns SET status = p_status, error = p_error, ended_at = now() WHERE id = p_turn;
    IF p_reply THEN
        INSERT INTO messages (appid, turn_id, role, content, extra, status, error, model, tokens)
        VALUES (v_appid, p_turn, 'assistant', p_content, p_extra,
                CASE WHEN p_status = 'rejected' THEN 'failed' ELSE p_status END,
                p_error, p_model, p_tokens);
    END IF;
    DELETE FROM leases WHERE appid = v_appid AND turn_id = p_turn;
    RETURN 'stored';
END
$$;

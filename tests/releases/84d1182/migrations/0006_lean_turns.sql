-- The same turn contract with less work per turn (see README, Benchmarks):
-- * begin_turn walks the window before it inserts the turn, so the turn row is written
--   once (0005 inserted it, then updated it twice), and it records at the same time which
--   earlier turns were delivered (p_delivered: marks a process collected since its last
--   statement, so marking a delivery costs no round trip of its own);
-- * end_turn writes the turn row once (0005 updated it twice), and learns token counts
--   from one pass over what the turn sent;
-- * a resend is recognised by the turn's incoming messages only (nincoming), so a turn
--   whose tool rounds added messages is answered from storage too; and a double send (the
--   same messages sent again while that turn runs) is answered from storage as well: a busy
--   begin_turn returns the running turn's id, which the waiting request passes back;
-- * a lease is released by expiring it, not deleting its row: the next turn's upsert then
--   updates the row in place instead of inserting it again (no index churn per turn);
-- * begin_turn's commit does not wait for the WAL flush: a pending turn lost with a crash
--   of PostgreSQL itself was never part of the conversation, and its end then reports
--   the turn lost.  end_turn's commit still waits: `done` means stored.

-- How many of a turn's messages are its incoming ones (the first, by seq): a turn's tool
-- rounds add messages of their own, and a resend repeats only the incoming ones.
ALTER TABLE turns ADD COLUMN nincoming integer;

DROP FUNCTION begin_turn(text, text, double precision, jsonb, boolean, double precision,
                         integer, integer);
-- (The new begin_turn returns one row also when busy: turn_id NULL, replay.waiting_for.)
CREATE FUNCTION begin_turn(p_appid text, p_owner text, p_lease_seconds double precision,
                           p_messages jsonb, p_replace boolean DEFAULT false,
                           p_resend_seconds double precision DEFAULT 0,
                           p_budget integer DEFAULT NULL, p_context integer DEFAULT NULL,
                           p_delivered bigint[] DEFAULT NULL, p_waited_for bigint DEFAULT NULL)
RETURNS TABLE (turn_id bigint, history jsonb, sent_messages integer, sent_tokens integer,
               omitted_messages bigint, omitted_tokens bigint, replay jsonb)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_turn bigint := nextval('turn_ids');
    v_last turns%ROWTYPE;
    v_reply jsonb;
    v_new_n integer;
    v_new_tokens integer;
    v_continues boolean;
    v_fresh boolean;
    v_sys_n integer := 0;
    v_sys_tokens integer := 0;
    v_left bigint;
    v_ids bigint[] := '{}';
    v_from bigint;
    v_win_n integer := 0;
    v_win_tokens integer := 0;
    v_size_n bigint;
    v_size_tokens bigint;
    v_t_tokens integer;
    v_t_n integer;
    v_pend_ids bigint[] := '{}';
    v_pend_n integer := 0;
    v_pend_tokens bigint := 0;
    v_below bigint := v_turn;
    v_batch integer;
    r record;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF p_delivered IS NOT NULL THEN
        -- Best effort, never waiting: a row another transaction holds keeps its mark for a
        -- later flush to miss, which only means a resend gets the stored answer again.
        UPDATE turns SET delivered = true
         WHERE id IN (SELECT id FROM turns WHERE id = ANY(p_delivered) AND NOT delivered
                      FOR UPDATE SKIP LOCKED);
    END IF;
    INSERT INTO leases AS l (appid, turn_id, owner, expires_at)
    VALUES (p_appid, v_turn, p_owner, clock_timestamp() + make_interval(secs => p_lease_seconds))
    ON CONFLICT (appid) DO UPDATE
        SET turn_id = EXCLUDED.turn_id, owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
        WHERE l.expires_at <= clock_timestamp();
    IF NOT FOUND THEN  -- busy: say which turn holds the appID (turn_id NULL)
        RETURN QUERY SELECT NULL::bigint, NULL::jsonb, 0, 0, 0::bigint, 0::bigint,
            jsonb_build_object('waiting_for', (SELECT l.turn_id FROM leases l WHERE l.appid = p_appid));
        RETURN;
    END IF;
    UPDATE turns SET status = 'abandoned', ended_at = now(),
                     error = 'its chatterd process stopped before the turn ended'
     WHERE appid = p_appid AND status = 'running';

    -- A resend of the last turn, ended but never delivered (0004).
    IF p_resend_seconds > 0 AND NOT p_replace THEN
        SELECT * INTO v_last FROM turns
         WHERE appid = p_appid AND status IN ('complete', 'interrupted', 'failed')
         ORDER BY id DESC LIMIT 1;
        -- A resend: the last turn's end never reached its client; or a double send: this
        -- request arrived while that very turn was running (p_waited_for) with the same
        -- messages.  Either way it is answered from storage.
        IF v_last.status IN ('complete', 'failed')
           AND (NOT v_last.delivered OR v_last.id = p_waited_for)
           AND v_last.ended_at > now() - make_interval(secs => p_resend_seconds)
           AND v_last.nincoming = jsonb_array_length(p_messages)
           AND (SELECT jsonb_agg(jsonb_build_object('role', i.role, 'content', i.content,
                                                    'extra', i.extra) ORDER BY i.seq)
                  FROM (SELECT m.seq, m.role, m.content, m.extra FROM messages m
                         WHERE m.turn_id = v_last.id ORDER BY m.seq LIMIT v_last.nincoming) i)
               = (SELECT jsonb_agg(jsonb_build_object('role', e.m->'role', 'content', e.m->'content',
                                                      'extra', nullif(e.m->'extra', 'null'::jsonb))
                                   ORDER BY e.i)
                    FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i)) THEN
            SELECT jsonb_build_object('content', m.content, 'extra', m.extra, 'model', m.model,
                                      'tokens', m.tokens, 'status', v_last.status,
                                      'error', v_last.error)
              INTO v_reply FROM messages m
             WHERE m.turn_id = v_last.id AND m.role = 'assistant' ORDER BY m.seq DESC LIMIT 1;
            UPDATE leases SET expires_at = '-infinity'
             WHERE appid = p_appid AND leases.turn_id = v_turn;
            RETURN QUERY SELECT v_last.id, NULL::jsonb, 0, 0, 0::bigint, 0::bigint,
                coalesce(v_reply, jsonb_build_object('status', v_last.status, 'error', v_last.error));
            RETURN;
        END IF;
    END IF;

    -- The new messages, as they will be stored (0005: estimates until Ollama tells).
    SELECT count(*), coalesce(sum(estimate_tokens(e.m->>'content', nullif(e.m->'extra', 'null'::jsonb))), 0),
           coalesce((array_agg(e.m->>'role' ORDER BY e.i)
                     FILTER (WHERE e.m->>'role' <> 'system'))[1] = 'tool', false)
      INTO v_new_n, v_new_tokens, v_continues
      FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i);

    IF p_replace THEN
        DELETE FROM turns WHERE appid = p_appid;  -- messages go with them (cascade)
        DELETE FROM conversation_sizes WHERE appid = p_appid;
        DELETE FROM tool_schemas WHERE appid = p_appid;  -- kept with the conversation (0003)
        v_fresh := true;
    ELSE
        -- The first turn of an appID (every conversation starts so) has nothing to read.
        v_fresh := NOT EXISTS (SELECT 1 FROM turns t WHERE t.appid = p_appid);
    END IF;

    IF NOT v_fresh THEN
        -- The system prompts: always sent (index messages_system).
        SELECT count(*), coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra))), 0)
          INTO v_sys_n, v_sys_tokens
          FROM messages m JOIN turns t ON t.id = m.turn_id
         WHERE m.appid = p_appid AND m.role = 'system' AND m.turn_id < v_turn
           AND t.status IN ('complete', 'interrupted', 'failed');

        -- The newest whole turns that fit, walking back from the newest (as 0005).
        v_left := coalesce(p_budget::bigint, 9223372036854775807) - v_sys_tokens - v_new_tokens;
        <<walk>>
        LOOP
            v_batch := 0;
            FOR r IN SELECT t.id, t.tokens, t.nmessages, t.continues FROM turns t
                      WHERE t.appid = p_appid AND t.id < v_below
                        AND t.status IN ('complete', 'interrupted', 'failed')
                      ORDER BY t.id DESC LIMIT 32 LOOP
                v_batch := v_batch + 1;
                v_below := r.id;
                v_t_tokens := r.tokens;
                v_t_n := r.nmessages;
                IF v_t_tokens IS NULL THEN  -- a turn stored by other means
                    SELECT s.tokens, s.nmessages INTO v_t_tokens, v_t_n FROM turn_size(r.id) s;
                END IF;
                v_pend_ids := v_pend_ids || r.id;
                v_pend_n := v_pend_n + v_t_n;
                v_pend_tokens := v_pend_tokens + v_t_tokens;
                EXIT walk WHEN v_pend_tokens > v_left;
                CONTINUE WHEN r.continues;  -- needs the turn before it
                v_left := v_left - v_pend_tokens;
                v_ids := v_ids || v_pend_ids;
                v_from := r.id;
                v_win_n := v_win_n + v_pend_n;
                v_win_tokens := v_win_tokens + v_pend_tokens;
                v_pend_ids := '{}';
                v_pend_n := 0;
                v_pend_tokens := 0;
            END LOOP;
            EXIT walk WHEN v_batch < 32;
        END LOOP;
    END IF;

    -- The turn, written once, then its messages.
    INSERT INTO turns (id, appid, owner, context_tokens, continues, window_from, window_turns,
                       sent_tokens, nincoming)
    VALUES (v_turn, p_appid, p_owner, p_context, v_continues, v_from, v_ids,
            v_sys_tokens + v_win_tokens + v_new_tokens, v_new_n);
    INSERT INTO messages (appid, turn_id, role, content, extra, ntokens)
    SELECT p_appid, v_turn, e.m->>'role', e.m->>'content', nullif(e.m->'extra', 'null'::jsonb),
           estimate_tokens(e.m->>'content', nullif(e.m->'extra', 'null'::jsonb))
      FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i) ORDER BY e.i;

    IF v_fresh THEN
        INSERT INTO conversation_sizes (appid, messages, tokens) VALUES (p_appid, 0, 0)
        ON CONFLICT (appid) DO NOTHING;
        RETURN QUERY SELECT v_turn, '[]'::jsonb, v_new_n, v_new_tokens, 0::bigint, 0::bigint,
            NULL::jsonb;
        RETURN;
    END IF;

    SELECT s.messages, s.tokens INTO v_size_n, v_size_tokens
      FROM conversation_sizes s WHERE s.appid = p_appid;
    IF NOT FOUND THEN  -- a conversation stored by other means: counted once, then kept
        SELECT count(*), coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra))), 0)
          INTO v_size_n, v_size_tokens
          FROM messages m JOIN turns t ON t.id = m.turn_id
         WHERE m.appid = p_appid AND t.appid = p_appid AND t.id < v_turn
           AND t.status IN ('complete', 'interrupted', 'failed')
           AND is_sent(m.status, m.content, m.extra);
        INSERT INTO conversation_sizes (appid, messages, tokens)
        VALUES (p_appid, v_size_n, v_size_tokens) ON CONFLICT (appid) DO NOTHING;
    END IF;

    RETURN QUERY
    SELECT v_turn,
           (SELECT coalesce(jsonb_agg(jsonb_build_object('role', h.role, 'content', h.content)
                                      || coalesce(h.extra, '{}'::jsonb)
                                      ORDER BY h.sys DESC, h.turn_id, h.seq), '[]'::jsonb)
              FROM (SELECT true AS sys, m.turn_id, m.seq, m.role, m.content, m.extra
                      FROM messages m JOIN turns t ON t.id = m.turn_id
                     WHERE m.appid = p_appid AND m.role = 'system' AND m.turn_id < v_turn
                       AND t.status IN ('complete', 'interrupted', 'failed')
                    UNION ALL
                    SELECT false, m.turn_id, m.seq, m.role, m.content, m.extra
                      FROM messages m
                     WHERE m.appid = p_appid AND m.turn_id = ANY(v_ids)
                       AND m.role <> 'system' AND is_sent(m.status, m.content, m.extra)) h),
           v_sys_n + v_win_n + v_new_n,
           v_sys_tokens + v_win_tokens + v_new_tokens,
           greatest(v_size_n - v_sys_n - v_win_n, 0),
           greatest(v_size_tokens - v_sys_tokens - v_win_tokens, 0),
           NULL::jsonb;
END
$$;

-- End a turn (as 0005), writing its row once.
CREATE OR REPLACE FUNCTION end_turn(p_turn bigint, p_status text, p_error text, p_content text,
                                    p_extra jsonb, p_model text, p_tokens integer,
                                    p_reply boolean, p_prompt_tokens integer)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
    v_appid text;
    v_learned text;
    v_error text := p_error;
    v_tokens integer;
    v_n integer;
    v_ended boolean := p_status IN ('complete', 'interrupted', 'failed');
BEGIN
    SELECT status, appid INTO v_status, v_appid FROM turns WHERE id = p_turn FOR UPDATE;
    IF v_status IS NULL THEN
        RETURN 'lost';
    ELSIF v_status <> 'running' THEN
        RETURN CASE WHEN v_status = p_status THEN 'already' ELSE 'lost' END;
    END IF;
    IF v_ended AND p_prompt_tokens IS NOT NULL THEN
        v_learned := learn_tokens(p_turn, p_prompt_tokens);
        IF v_learned = 'suspect' THEN
            v_error := coalesce(v_error || '; ', '')
                || 'Ollama counted fewer prompt tokens than were sent: it may have cut the prompt';
        END IF;
    END IF;
    IF p_reply THEN
        INSERT INTO messages (appid, turn_id, role, content, extra, status, error, model, tokens,
                              ntokens, ntokens_from)
        VALUES (v_appid, p_turn, 'assistant', p_content, p_extra,
                CASE WHEN p_status = 'rejected' THEN 'failed' ELSE p_status END,
                p_error, p_model, p_tokens,
                CASE WHEN p_tokens IS NOT NULL AND p_status = 'complete' THEN p_tokens
                     ELSE estimate_tokens(p_content, p_extra) END,
                CASE WHEN p_tokens IS NOT NULL AND p_status = 'complete' THEN 'ollama'
                     ELSE 'estimate' END);
    END IF;
    IF v_ended THEN
        -- turn_size(p_turn), written out: a SQL function is planned again on every call.
        SELECT coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra))), 0)::integer,
               count(*)::integer
          INTO v_tokens, v_n
          FROM messages m
         WHERE m.turn_id = p_turn AND m.role <> 'system' AND is_sent(m.status, m.content, m.extra);
        INSERT INTO conversation_sizes AS c (appid, messages, tokens)
        SELECT v_appid, count(*), coalesce(sum(ntokens), 0) FROM messages
         WHERE turn_id = p_turn AND is_sent(status, content, extra)
        ON CONFLICT (appid) DO UPDATE
            SET messages = c.messages + EXCLUDED.messages, tokens = c.tokens + EXCLUDED.tokens;
    END IF;
    UPDATE turns SET status = p_status, error = v_error, ended_at = now(),
                     prompt_tokens = p_prompt_tokens,
                     tokens = coalesce(v_tokens, tokens), nmessages = coalesce(v_n, nmessages)
     WHERE id = p_turn;
    UPDATE leases SET expires_at = '-infinity' WHERE appid = v_appid AND turn_id = p_turn;
    RETURN CASE WHEN v_learned = 'suspect' THEN 'stored-suspect' ELSE 'stored' END;
END
$$;

-- What turn p_turn sent (as 0005), reading the window's messages in one index scan.
ALTER FUNCTION sent_by(bigint) RESET search_path;
ALTER FUNCTION turn_size(bigint) RESET search_path;
-- No SET clause: a SQL function with one is planned again on every call and cannot be
-- inlined; its callers (learn_tokens) set chatterd's search_path themselves.
CREATE OR REPLACE FUNCTION sent_by(p_turn bigint)
RETURNS TABLE (seq bigint, turn_id bigint, ntokens integer, ntokens_from text, est integer)
LANGUAGE sql STABLE AS $$
    WITH t0 AS (SELECT appid, window_turns FROM turns WHERE id = p_turn)
    SELECT m.seq, m.turn_id, coalesce(m.ntokens, estimate_tokens(m.content, m.extra)),
           m.ntokens_from, estimate_tokens(m.content, m.extra)
      FROM t0, messages m JOIN turns t ON t.id = m.turn_id
     WHERE m.appid = t0.appid AND m.role = 'system' AND m.turn_id < p_turn
       AND t.status IN ('complete', 'interrupted', 'failed')
    UNION ALL
    SELECT m.seq, m.turn_id, coalesce(m.ntokens, estimate_tokens(m.content, m.extra)),
           m.ntokens_from, estimate_tokens(m.content, m.extra)
      FROM t0, messages m
     WHERE m.appid = t0.appid AND m.turn_id = ANY(t0.window_turns)
       AND m.role <> 'system' AND is_sent(m.status, m.content, m.extra)
    UNION ALL
    SELECT m.seq, m.turn_id, coalesce(m.ntokens, estimate_tokens(m.content, m.extra)),
           m.ntokens_from, estimate_tokens(m.content, m.extra)
      FROM messages m WHERE m.turn_id = p_turn
$$;

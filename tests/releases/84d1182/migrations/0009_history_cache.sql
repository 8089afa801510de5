-- A process keeps the messages of the turns it has read (db/history_cache.py): an ended
-- turn's sent messages never change (only their token counts are learned later), so
-- begin_turn need not read them again.  p_cached lists the turn ids the caller has;
-- `history` then holds the system prompts and the messages of the window's other turns
-- only, `history_turns` the turn of each, and `window_turns` every turn the window holds
-- (the caller assembles the history: system prompts, then each window turn's messages in
-- turn order).  Everything else is as in 0006.

DROP FUNCTION begin_turn(text, text, double precision, jsonb, boolean, double precision,
                         integer, integer, bigint[], bigint);
CREATE FUNCTION begin_turn(p_appid text, p_owner text, p_lease_seconds double precision,
                           p_messages jsonb, p_replace boolean DEFAULT false,
                           p_resend_seconds double precision DEFAULT 0,
                           p_budget integer DEFAULT NULL, p_context integer DEFAULT NULL,
                           p_delivered bigint[] DEFAULT NULL, p_waited_for bigint DEFAULT NULL,
                           p_cached bigint[] DEFAULT NULL)
RETURNS TABLE (turn_id bigint, history jsonb, sent_messages integer, sent_tokens integer,
               omitted_messages bigint, omitted_tokens bigint, replay jsonb,
               window_turns bigint[], history_turns bigint[])
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
            jsonb_build_object('waiting_for', (SELECT l.turn_id FROM leases l WHERE l.appid = p_appid)),
            NULL::bigint[], NULL::bigint[];
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
                coalesce(v_reply, jsonb_build_object('status', v_last.status, 'error', v_last.error)),
                NULL::bigint[], NULL::bigint[];
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
            NULL::jsonb, '{}'::bigint[], '{}'::bigint[];
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
    SELECT v_turn, agg.history, v_sys_n + v_win_n + v_new_n, v_sys_tokens + v_win_tokens + v_new_tokens,
           greatest(v_size_n - v_sys_n - v_win_n, 0),
           greatest(v_size_tokens - v_sys_tokens - v_win_tokens, 0),
           NULL::jsonb, v_ids, agg.turns
      FROM (SELECT coalesce(jsonb_agg(jsonb_build_object('role', h.role, 'content', h.content)
                                      || coalesce(h.extra, '{}'::jsonb)
                                      ORDER BY h.sys DESC, h.turn_id, h.seq), '[]'::jsonb) AS history,
                   coalesce(array_agg(h.turn_id ORDER BY h.sys DESC, h.turn_id, h.seq), '{}') AS turns
              FROM (SELECT true AS sys, m.turn_id, m.seq, m.role, m.content, m.extra
                      FROM messages m JOIN turns t ON t.id = m.turn_id
                     WHERE m.appid = p_appid AND m.role = 'system' AND m.turn_id < v_turn
                       AND t.status IN ('complete', 'interrupted', 'failed')
                    UNION ALL
                    SELECT false, m.turn_id, m.seq, m.role, m.content, m.extra
                      FROM messages m
                     WHERE m.appid = p_appid AND m.turn_id = ANY(v_ids)
                       AND NOT m.turn_id = ANY(coalesce(p_cached, '{}'))
                       AND m.role <> 'system' AND is_sent(m.status, m.content, m.extra)) h) agg;
END
$$;

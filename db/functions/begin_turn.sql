-- Start a turn of an owner's conversation (p_owner_id, p_appid), in one round trip
-- (db/conversations.py begin_turn and ready_connection call it).  Every statement names the
-- owner: the same appID under another owner is another conversation, with its own lease,
-- turns, resends and size (db/migrations/0021_owners.sql).  p_process is the chatterd
-- process running the turn (the `owner` column of turns and leases).
--
-- It takes the appID's lease: one turn at a time per appID, across processes.  A lease is
-- renewed by its process while the turn runs; one that expired (its process is gone) is
-- taken over, and the turn it held is marked abandoned.  The incoming messages p_messages
-- are stored as a pending turn: they enter the conversation when end_turn ends the turn.
-- It returns what the model is sent within p_budget tokens: every system prompt, then the
-- newest whole earlier turns that fit, oldest first.  The turn's own messages are not in
-- `history` but are always sent (the caller appends them) and are counted in sent_*;
-- omitted_* is what older turns were left out.  p_budget NULL sends the whole conversation.
-- The work done is the system prompts, the turns sent and one more, never the whole
-- conversation.
--
-- The conversation is made of the ended turns (complete, interrupted, failed) but those
-- that ended before any answer text (`unanswered`, see end_turn): their messages are
-- never sent again.
--
-- * Busy (another live turn holds the lease): one row, turn_id NULL and
--   replay = {"waiting_for": the running turn's id}.
-- * p_replace (/llmprep): the appID's earlier turns and its kept tool schemas are deleted
--   first, and its size is zero again (its row, with the title its owner gave it, stays).
-- * A resend is answered from storage: when the appID's last ended turn is complete or
--   failed, ended less than p_resend_seconds ago, had exactly these incoming messages (its
--   first nincoming: tool rounds add more), and its end never reached its client (not
--   delivered) or it is the turn this request waited for (p_waited_for: a double send,
--   the same messages sent again while that turn ran), nothing is stored, the lease is
--   released, and the row is that turn's id with replay = its stored reply {content,
--   extra, model, tokens, status, error}.  A turn that ended before any answer text is
--   never replayed: sending it again asks the model again.
-- * p_delivered, p_delivered_owners: the turns (ids, and the owner of each) whose end
--   reached their client since the process's last call, marked delivered first, so
--   marking costs no round trip of its own.
-- * p_cached: the turns whose messages the caller holds already (db/history_cache.py):
--   `history` then holds the system prompts and the messages of the window's other turns
--   only, `history_turns` the turn of each, and `window_turns` every turn of the window
--   (the caller assembles the history: system prompts, then each window turn's messages
--   in turn order).
--
-- The commit does not wait for the WAL flush (synchronous_commit off, for this transaction
-- only): a pending turn lost with a crash of PostgreSQL itself was never part of the
-- conversation, and its end then reports the turn lost.  A released lease keeps its row,
-- expired at -infinity, so the next turn's upsert updates it in place.
DROP FUNCTION IF EXISTS begin_turn(text, text, double precision, jsonb, boolean, double precision,
                                   integer, integer, bigint[], bigint, bigint[]);
CREATE OR REPLACE FUNCTION begin_turn(p_owner_id bigint, p_appid text, p_process text,
                                      p_lease_seconds double precision,
                                      p_messages jsonb, p_replace boolean DEFAULT false,
                                      p_resend_seconds double precision DEFAULT 0,
                                      p_budget integer DEFAULT NULL, p_context integer DEFAULT NULL,
                                      p_delivered bigint[] DEFAULT NULL,
                                      p_delivered_owners bigint[] DEFAULT NULL,
                                      p_waited_for bigint DEFAULT NULL,
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
    v_id bigint;
    v_owner_id bigint;
    v_i integer;
    r record;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Best effort, never waiting: a row another transaction holds keeps its mark for a
    -- later flush to miss, which only means a resend gets the stored answer again.
    -- The usual few, one id at a time: `id = v_id` costs the same planned for any id, so
    -- after its first five runs on a connection PostgreSQL keeps one generic plan for it.
    -- The set form is planned anew on every call (a custom plan for a short array always
    -- looks cheaper than the generic one), so it is kept for longer lists.
    IF cardinality(p_delivered) <= 4 THEN
        FOR v_i IN 1 .. cardinality(p_delivered) LOOP
            v_id := p_delivered[v_i];
            v_owner_id := p_delivered_owners[v_i];
            UPDATE turns SET delivered = true
             WHERE owner_id = v_owner_id
               AND id = (SELECT t.id FROM turns t
                          WHERE t.owner_id = v_owner_id AND t.id = v_id AND NOT t.delivered
                         FOR UPDATE SKIP LOCKED);
        END LOOP;
    ELSIF p_delivered IS NOT NULL THEN
        UPDATE turns SET delivered = true
         WHERE (owner_id, id) IN (
               SELECT t.owner_id, t.id
                 FROM turns t JOIN unnest(p_delivered_owners, p_delivered) AS d(owner_id, id)
                      ON t.owner_id = d.owner_id AND t.id = d.id
                WHERE NOT t.delivered FOR UPDATE OF t SKIP LOCKED);
    END IF;
    INSERT INTO leases AS l (owner_id, appid, turn_id, owner, expires_at)
    VALUES (p_owner_id, p_appid, v_turn, p_process,
            clock_timestamp() + make_interval(secs => p_lease_seconds))
    ON CONFLICT (owner_id, appid) DO UPDATE
        SET turn_id = EXCLUDED.turn_id, owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
        WHERE l.expires_at <= clock_timestamp();
    IF NOT FOUND THEN  -- busy: say which turn holds the appID (turn_id NULL)
        RETURN QUERY SELECT NULL::bigint, NULL::jsonb, 0, 0, 0::bigint, 0::bigint,
            jsonb_build_object('waiting_for', (SELECT l.turn_id FROM leases l
                                                WHERE l.owner_id = p_owner_id AND l.appid = p_appid)),
            NULL::bigint[], NULL::bigint[];
        RETURN;
    END IF;
    -- The first turn of an appID (every conversation starts so) has nothing before it:
    -- no turn left running to abandon, no last turn to resend, nothing to read.
    v_fresh := NOT EXISTS (SELECT 1 FROM turns t WHERE t.owner_id = p_owner_id AND t.appid = p_appid);
    IF NOT v_fresh THEN
        UPDATE turns SET status = 'abandoned', ended_at = now(),
                         error = 'its chatterd process stopped before the turn ended'
         WHERE owner_id = p_owner_id AND appid = p_appid AND status = 'running';
    END IF;

    -- A resend of the last turn, ended but never delivered.
    IF p_resend_seconds > 0 AND NOT p_replace AND NOT v_fresh THEN
        SELECT * INTO v_last FROM turns
         WHERE owner_id = p_owner_id AND appid = p_appid
           AND status IN ('complete', 'interrupted', 'failed')
         ORDER BY id DESC LIMIT 1;
        -- A resend: the last turn's end never reached its client; or a double send: this
        -- request arrived while that very turn was running (p_waited_for) with the same
        -- messages.  Either way it is answered from storage.
        IF v_last.status IN ('complete', 'failed') AND NOT v_last.unanswered
           AND (NOT v_last.delivered OR v_last.id = p_waited_for)
           AND v_last.ended_at > now() - make_interval(secs => p_resend_seconds)
           AND v_last.nincoming = jsonb_array_length(p_messages)
           AND (SELECT jsonb_agg(jsonb_build_object('role', i.role, 'content', i.content,
                                                    'extra', i.extra) ORDER BY i.seq)
                  FROM (SELECT m.seq, m.role, m.content, m.extra FROM messages m
                         WHERE m.owner_id = p_owner_id AND m.turn_id = v_last.id
                         ORDER BY m.seq LIMIT v_last.nincoming) i)
               = (SELECT jsonb_agg(jsonb_build_object('role', e.m->'role', 'content', e.m->'content',
                                                      'extra', nullif(e.m->'extra', 'null'::jsonb))
                                   ORDER BY e.i)
                    FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i)) THEN
            SELECT jsonb_build_object('content', m.content, 'extra', m.extra, 'model', m.model,
                                      'tokens', m.tokens, 'status', v_last.status,
                                      'error', v_last.error)
              INTO v_reply FROM messages m
             WHERE m.owner_id = p_owner_id AND m.turn_id = v_last.id AND m.role = 'assistant'
             ORDER BY m.seq DESC LIMIT 1;
            UPDATE leases SET expires_at = '-infinity'
             WHERE owner_id = p_owner_id AND appid = p_appid AND leases.turn_id = v_turn;
            RETURN QUERY SELECT v_last.id, NULL::jsonb, 0, 0, 0::bigint, 0::bigint,
                coalesce(v_reply, jsonb_build_object('status', v_last.status, 'error', v_last.error)),
                NULL::bigint[], NULL::bigint[];
            RETURN;
        END IF;
    END IF;

    -- The new messages, as they will be stored (estimated until learn_tokens learns them).
    SELECT count(*), coalesce(sum(estimate_tokens(e.m->>'content', nullif(e.m->'extra', 'null'::jsonb))), 0),
           coalesce((array_agg(e.m->>'role' ORDER BY e.i)
                     FILTER (WHERE e.m->>'role' <> 'system'))[1] = 'tool', false)
      INTO v_new_n, v_new_tokens, v_continues
      FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i);

    IF p_replace THEN
        DELETE FROM turns WHERE owner_id = p_owner_id AND appid = p_appid;  -- messages go too
        DELETE FROM tool_schemas WHERE owner_id = p_owner_id AND appid = p_appid;  -- kept with it
        -- Its row stays, with its title: an app sets its system prompt with /llmprep each
        -- time it starts, and the name its owner gave the conversation must survive that.
        UPDATE conversation_sizes SET messages = 0, tokens = 0, model = NULL
         WHERE owner_id = p_owner_id AND appid = p_appid;
        v_fresh := true;
    END IF;

    IF NOT v_fresh THEN
        -- The system prompts: always sent (index messages_system).
        SELECT count(*), coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra))), 0)
          INTO v_sys_n, v_sys_tokens
          FROM messages m JOIN turns t ON t.owner_id = m.owner_id AND t.id = m.turn_id
         WHERE m.owner_id = p_owner_id AND m.appid = p_appid AND m.role = 'system'
           AND m.turn_id < v_turn AND t.status IN ('complete', 'interrupted', 'failed')
           AND NOT t.unanswered;

        -- The newest whole turns that fit, walking back from the newest (index turns_appid,
        -- backwards); the first that does not fit ends the walk, so what is sent is
        -- contiguous.  A turn that continues the one before (it starts with a tool result
        -- for that turn's call) is taken only together with it: they fit together or not
        -- at all.  In batches with LIMIT, so the plan is always the backward index scan (a
        -- cursor over the whole appID may be planned as a sort of all its turns).
        v_left := coalesce(p_budget::bigint, 9223372036854775807) - v_sys_tokens - v_new_tokens;
        <<walk>>
        LOOP
            v_batch := 0;
            FOR r IN SELECT t.id, t.tokens, t.nmessages, t.continues FROM turns t
                      WHERE t.owner_id = p_owner_id AND t.appid = p_appid AND t.id < v_below
                        AND t.status IN ('complete', 'interrupted', 'failed') AND NOT t.unanswered
                      ORDER BY t.id DESC LIMIT 32 LOOP
                v_batch := v_batch + 1;
                v_below := r.id;
                v_t_tokens := r.tokens;
                v_t_n := r.nmessages;
                IF v_t_tokens IS NULL THEN  -- a turn stored by other means
                    SELECT s.tokens, s.nmessages INTO v_t_tokens, v_t_n
                      FROM turn_size(p_owner_id, r.id) s;
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
    INSERT INTO turns (owner_id, id, appid, owner, context_tokens, continues, window_from,
                       window_turns, sent_tokens, nincoming)
    VALUES (p_owner_id, v_turn, p_appid, p_process, p_context, v_continues, v_from, v_ids,
            v_sys_tokens + v_win_tokens + v_new_tokens, v_new_n);
    INSERT INTO messages (owner_id, appid, turn_id, role, content, extra, ntokens)
    SELECT p_owner_id, p_appid, v_turn, e.m->>'role', e.m->>'content', nullif(e.m->'extra', 'null'::jsonb),
           estimate_tokens(e.m->>'content', nullif(e.m->'extra', 'null'::jsonb))
      FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i) ORDER BY e.i;

    IF v_fresh THEN
        INSERT INTO conversation_sizes (owner_id, appid, messages, tokens)
        VALUES (p_owner_id, p_appid, 0, 0) ON CONFLICT (owner_id, appid) DO NOTHING;
        RETURN QUERY SELECT v_turn, '[]'::jsonb, v_new_n, v_new_tokens, 0::bigint, 0::bigint,
            NULL::jsonb, '{}'::bigint[], '{}'::bigint[];
        RETURN;
    END IF;

    SELECT s.messages, s.tokens INTO v_size_n, v_size_tokens
      FROM conversation_sizes s WHERE s.owner_id = p_owner_id AND s.appid = p_appid;
    IF NOT FOUND THEN  -- a conversation stored by other means: counted once, then kept
        SELECT count(*), coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra))), 0)
          INTO v_size_n, v_size_tokens
          FROM messages m JOIN turns t ON t.owner_id = m.owner_id AND t.id = m.turn_id
         WHERE m.owner_id = p_owner_id AND m.appid = p_appid
           AND t.owner_id = p_owner_id AND t.appid = p_appid AND t.id < v_turn
           AND t.status IN ('complete', 'interrupted', 'failed') AND NOT t.unanswered
           AND is_sent(m.status, m.content, m.extra);
        INSERT INTO conversation_sizes (owner_id, appid, messages, tokens)
        VALUES (p_owner_id, p_appid, v_size_n, v_size_tokens)
        ON CONFLICT (owner_id, appid) DO NOTHING;
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
                      FROM messages m JOIN turns t ON t.owner_id = m.owner_id AND t.id = m.turn_id
                     WHERE m.owner_id = p_owner_id AND m.appid = p_appid AND m.role = 'system'
                       AND m.turn_id < v_turn AND t.status IN ('complete', 'interrupted', 'failed')
                       AND NOT t.unanswered
                    UNION ALL
                    SELECT false, m.turn_id, m.seq, m.role, m.content, m.extra
                      FROM messages m
                     WHERE m.owner_id = p_owner_id AND m.appid = p_appid AND m.turn_id = ANY(v_ids)
                       AND NOT m.turn_id = ANY(coalesce(p_cached, '{}'))
                       AND m.role <> 'system' AND is_sent(m.status, m.content, m.extra)) h) agg;
END
$$;

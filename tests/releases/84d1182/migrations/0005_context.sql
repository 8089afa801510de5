-- Long conversations: a context budget per turn, token counts per message, and a history
-- read whose cost depends on the budget, not on the conversation's length.
--
-- Every message has `ntokens`, what it costs in a prompt: first an estimate from its size,
-- then, once Ollama has answered a turn that sent it, a count learned from Ollama's own
-- numbers (`ntokens_from`: 'estimate', 'ollama' = exactly Ollama's count, 'shared' = an
-- exact total of several messages, shared in proportion to their estimates).  A turn keeps
-- the total of its messages that the conversation sends (`tokens`, `nmessages`; system
-- prompts excluded: they are always sent), so the newest turns that fit a budget are found
-- by walking turns newest first and stopping when the budget is full.

-- What a message costs before Ollama has told us: 4 tokens of template per message, a
-- token per 4 bytes of UTF-8 (bytes, not characters: a CJK character is 3 bytes and about
-- one token), the tool calls' JSON likewise, and 768 per image.
CREATE FUNCTION estimate_tokens(p_content text, p_extra jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT 4 + ceil(octet_length(coalesce(p_content, '')) / 4.0)::integer
             + coalesce(ceil(octet_length((p_extra -> 'tool_calls')::text) / 4.0)::integer, 0)
             + CASE WHEN jsonb_typeof(p_extra -> 'images') = 'array'
                    THEN 768 * jsonb_array_length(p_extra -> 'images') ELSE 0 END
$$;

-- Whether a stored message is sent to the model (the rule of conversation_of: a reply that
-- ended with neither text nor tool calls is left out).
CREATE FUNCTION is_sent(p_status text, p_content text, p_extra jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_status = 'complete' OR p_content <> '' OR coalesce(p_extra ? 'tool_calls', false)
$$;

ALTER TABLE messages
    ADD COLUMN ntokens integer,
    ADD COLUMN ntokens_from text NOT NULL DEFAULT 'estimate'
        CHECK (ntokens_from IN ('estimate', 'ollama', 'shared'));
UPDATE messages SET ntokens = CASE WHEN role = 'assistant' AND tokens IS NOT NULL
                                   THEN tokens ELSE estimate_tokens(content, extra) END,
                    ntokens_from = CASE WHEN role = 'assistant' AND tokens IS NOT NULL
                                        THEN 'ollama' ELSE 'estimate' END;
CREATE INDEX messages_system ON messages (appid, turn_id, seq) WHERE role = 'system';

ALTER TABLE turns
    ADD COLUMN tokens integer,          -- ended: ntokens of its sent, non-system messages
    ADD COLUMN nmessages integer,       -- ended: how many such messages
    ADD COLUMN context_tokens integer,  -- the context (num_ctx) the turn was budgeted for
    ADD COLUMN window_from bigint,      -- the oldest earlier turn it sent (NULL: none)
    ADD COLUMN window_turns bigint[],   -- the earlier turns it sent
    ADD COLUMN sent_tokens integer,     -- what it sent, as counted when it began
    ADD COLUMN prompt_tokens integer,   -- Ollama's prompt_eval_count for it
    -- It starts with a tool result (a client's tool, called at the end of the turn
    -- before): it is only ever sent together with that turn, so a call keeps its result.
    ADD COLUMN continues boolean NOT NULL DEFAULT false;
UPDATE turns t SET tokens = coalesce(s.tokens, 0), nmessages = coalesce(s.n, 0)
  FROM (SELECT turn_id, sum(ntokens) AS tokens, count(*) AS n FROM messages
         WHERE role <> 'system' AND is_sent(status, content, extra) GROUP BY turn_id) s
 WHERE s.turn_id = t.id;
UPDATE turns SET tokens = 0, nmessages = 0 WHERE tokens IS NULL AND status <> 'running';

-- The size of each appID's conversation (ended turns, sent messages, system prompts
-- included), kept by end_turn, so what a turn leaves out is known without counting it.
CREATE TABLE conversation_sizes (
    appid    text PRIMARY KEY,
    messages bigint NOT NULL,
    tokens   bigint NOT NULL
);
INSERT INTO conversation_sizes (appid, messages, tokens)
SELECT m.appid, count(*), sum(m.ntokens)
  FROM messages m JOIN turns t ON t.id = m.turn_id
 WHERE t.status IN ('complete', 'interrupted', 'failed') AND is_sent(m.status, m.content, m.extra)
 GROUP BY m.appid;

-- A turn's tokens/nmessages, for a turn stored without them (rows written by other means).
CREATE FUNCTION turn_size(p_turn bigint, OUT tokens integer, OUT nmessages integer)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(coalesce(ntokens, estimate_tokens(content, extra))), 0)::integer,
           count(*)::integer
      FROM messages WHERE turn_id = p_turn AND role <> 'system' AND is_sent(status, content, extra)
$$;

-- Start a turn (as 0002's begin_turn: lease, pending messages, one round trip), and return
-- what the model is sent within p_budget tokens: every system prompt, then the newest whole
-- earlier turns that fit, oldest first; the turn's own messages are not in `history` but are
-- always sent (the caller appends them), and counted in sent_*.  omitted_* is what older
-- turns were left out.  p_budget NULL sends the whole conversation.  The work done is the
-- system prompts, the turns sent and one more: never the whole conversation.
-- A resend of the appID's last turn, ended but never delivered, is answered from storage
-- as in 0004 (`replay` set, nothing stored, the lease not kept).
DROP FUNCTION begin_turn(text, text, double precision, jsonb, boolean, double precision);
CREATE FUNCTION begin_turn(p_appid text, p_owner text, p_lease_seconds double precision,
                           p_messages jsonb, p_replace boolean DEFAULT false,
                           p_resend_seconds double precision DEFAULT 0,
                           p_budget integer DEFAULT NULL, p_context integer DEFAULT NULL)
RETURNS TABLE (turn_id bigint, history jsonb, sent_messages integer, sent_tokens integer,
               omitted_messages bigint, omitted_tokens bigint, replay jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_turn bigint := nextval('turn_ids');
    v_last turns%ROWTYPE;
    v_reply jsonb;
    v_new_n integer;
    v_new_tokens integer;
    v_sys_n integer;
    v_sys_tokens integer;
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
    IF p_resend_seconds > 0 AND NOT p_replace THEN
        SELECT * INTO v_last FROM turns
         WHERE appid = p_appid AND status IN ('complete', 'interrupted', 'failed')
         ORDER BY id DESC LIMIT 1;
        IF v_last.status IN ('complete', 'failed') AND NOT v_last.delivered
           AND v_last.ended_at > now() - make_interval(secs => p_resend_seconds)
           AND (SELECT jsonb_agg(jsonb_build_object('role', m.role, 'content', m.content,
                                                    'extra', m.extra) ORDER BY m.seq)
                  FROM messages m WHERE m.turn_id = v_last.id AND m.role <> 'assistant')
               = (SELECT jsonb_agg(jsonb_build_object('role', e.m->'role', 'content', e.m->'content',
                                                      'extra', nullif(e.m->'extra', 'null'::jsonb))
                                   ORDER BY e.i)
                    FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i)) THEN
            SELECT jsonb_build_object('content', m.content, 'extra', m.extra, 'model', m.model,
                                      'tokens', m.tokens, 'status', v_last.status,
                                      'error', v_last.error)
              INTO v_reply FROM messages m
             WHERE m.turn_id = v_last.id AND m.role = 'assistant' ORDER BY m.seq DESC LIMIT 1;
            DELETE FROM leases WHERE appid = p_appid AND leases.turn_id = v_turn;
            RETURN QUERY SELECT v_last.id, NULL::jsonb, 0, 0, 0::bigint, 0::bigint,
                coalesce(v_reply, jsonb_build_object('status', v_last.status, 'error', v_last.error));
            RETURN;
        END IF;
    END IF;
    IF p_replace THEN
        DELETE FROM turns WHERE appid = p_appid;  -- messages go with them (cascade)
        DELETE FROM conversation_sizes WHERE appid = p_appid;
    END IF;
    INSERT INTO turns (id, appid, owner, context_tokens)
    VALUES (v_turn, p_appid, p_owner, p_context);
    INSERT INTO messages (appid, turn_id, role, content, extra, ntokens)
    SELECT p_appid, v_turn, e.m->>'role', e.m->>'content', nullif(e.m->'extra', 'null'::jsonb),
           estimate_tokens(e.m->>'content', nullif(e.m->'extra', 'null'::jsonb))
      FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS e(m, i)
     ORDER BY e.i;
    SELECT count(*), coalesce(sum(ntokens), 0) INTO v_new_n, v_new_tokens
      FROM messages m WHERE m.turn_id = v_turn;
    IF p_replace THEN
        UPDATE turns SET sent_tokens = v_new_tokens WHERE id = v_turn;
        RETURN QUERY SELECT v_turn, '[]'::jsonb, v_new_n, v_new_tokens, 0::bigint, 0::bigint,
            NULL::jsonb;
        RETURN;
    END IF;

    -- The system prompts: always sent (index messages_system).
    SELECT count(*), coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra))), 0)
      INTO v_sys_n, v_sys_tokens
      FROM messages m JOIN turns t ON t.id = m.turn_id
     WHERE m.appid = p_appid AND m.role = 'system' AND m.turn_id < v_turn
       AND t.status IN ('complete', 'interrupted', 'failed');

    -- The newest whole turns that fit, walking back from the newest (index turns_appid,
    -- backwards); the first that does not fit ends the walk, so what is sent is contiguous.
    -- A turn that continues the one before (a tool result for its call) is taken only
    -- together with it: they fit together or not at all.
    v_left := coalesce(p_budget::bigint, 9223372036854775807) - v_sys_tokens - v_new_tokens;
    UPDATE turns t SET continues = coalesce((
        SELECT m.role = 'tool' FROM messages m WHERE m.turn_id = v_turn AND m.role <> 'system'
         ORDER BY m.seq LIMIT 1), false)
     WHERE t.id = v_turn;
    -- In batches with LIMIT, so the plan is always the backward index scan (a cursor over
    -- the whole appID may be planned as a sort of all its turns).
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
    UPDATE turns SET window_from = v_from, window_turns = v_ids,
                     sent_tokens = v_sys_tokens + v_win_tokens + v_new_tokens
     WHERE id = v_turn;

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
                      FROM unnest(v_ids) AS w(id),
                           LATERAL (SELECT * FROM messages m WHERE m.turn_id = w.id OFFSET 0) m
                     WHERE m.role <> 'system' AND is_sent(m.status, m.content, m.extra)) h),
           v_sys_n + v_win_n + v_new_n,
           v_sys_tokens + v_win_tokens + v_new_tokens,
           greatest(v_size_n - v_sys_n - v_win_n, 0),
           greatest(v_size_tokens - v_sys_tokens - v_win_tokens, 0),
           NULL::jsonb;
END
$$;

-- What turn p_turn sent (besides nothing else): the system prompts, the messages of the
-- earlier turns in its window_turns, and its own messages (its reply excluded when it
-- is called before the reply is stored).  Bounded by what was sent.
CREATE FUNCTION sent_by(p_turn bigint)
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
      FROM t0, unnest(t0.window_turns) AS w(id),
           LATERAL (SELECT * FROM messages m WHERE m.turn_id = w.id OFFSET 0) m
     WHERE m.role <> 'system' AND is_sent(m.status, m.content, m.extra)
    UNION ALL
    SELECT m.seq, m.turn_id, coalesce(m.ntokens, estimate_tokens(m.content, m.extra)),
           m.ntokens_from, estimate_tokens(m.content, m.extra)
      FROM messages m WHERE m.turn_id = p_turn
$$;

-- Learn token counts from Ollama's prompt_eval_count for what turn p_turn sent (call it
-- before its reply is stored): the messages whose count is already learned are
-- subtracted, and what remains is the count of the others, shared among them in
-- proportion to their estimates (exact when there is one, the usual case: the new user
-- message; the first turn after /llmprep shares with the system prompt).  Nothing is
-- learned when the remainder is implausible (under one token per message: the model
-- changed, or Ollama cut the prompt) or the prompt filled the context.  Returns
-- 'learned', 'skipped' or 'suspect' (the count is below what is known to have been sent:
-- Ollama must have cut the prompt).
CREATE FUNCTION learn_tokens(p_turn bigint, p_prompt_tokens integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_appid text;
    v_ctx integer;
    v_known bigint;
    v_unknown_n integer;
    v_unknown_est bigint;
    v_rest bigint;
    v_delta bigint;
    v_turns bigint[];
BEGIN
    SELECT appid, context_tokens INTO v_appid, v_ctx FROM turns WHERE id = p_turn;
    SELECT coalesce(sum(s.ntokens) FILTER (WHERE s.ntokens_from <> 'estimate'), 0),
           count(*) FILTER (WHERE s.ntokens_from = 'estimate'),
           coalesce(sum(s.est) FILTER (WHERE s.ntokens_from = 'estimate'), 0)
      INTO v_known, v_unknown_n, v_unknown_est FROM sent_by(p_turn) s;
    v_rest := p_prompt_tokens - v_known;
    IF v_rest < 0 THEN
        RETURN 'suspect';
    END IF;
    IF v_unknown_n = 0 OR v_rest < v_unknown_n
       OR (v_ctx IS NOT NULL AND p_prompt_tokens >= v_ctx) THEN
        RETURN 'skipped';
    END IF;
    -- Shares by cumulative rounding, so they add up to v_rest exactly.
    WITH u AS (
        SELECT s.seq, s.turn_id, s.ntokens AS old, s.est,
               sum(s.est) OVER (ORDER BY s.seq) AS upto
          FROM sent_by(p_turn) s WHERE s.ntokens_from = 'estimate'),
    shares AS (
        SELECT u.seq, u.turn_id, u.old,
               (floor(v_rest::numeric * u.upto / v_unknown_est)
                - floor(v_rest::numeric * (u.upto - u.est) / v_unknown_est))::integer AS share
          FROM u),
    changed AS (
        UPDATE messages m SET ntokens = s.share,
                              ntokens_from = CASE WHEN v_unknown_n = 1 THEN 'ollama' ELSE 'shared' END
          FROM shares s WHERE m.seq = s.seq
        RETURNING s.turn_id, s.share - s.old AS delta)
    SELECT coalesce(sum(c.delta) FILTER (WHERE c.turn_id <> p_turn), 0),
           array_agg(DISTINCT c.turn_id) FILTER (WHERE c.turn_id <> p_turn)
      INTO v_delta, v_turns FROM changed c;
    -- Earlier turns whose messages were learned now: their totals, and the conversation's
    -- (this turn's own are counted when it ends).
    IF v_turns IS NOT NULL THEN
        UPDATE turns t SET tokens = s.tokens, nmessages = s.nmessages
          FROM unnest(v_turns) AS d(id), LATERAL turn_size(d.id) s
         WHERE t.id = d.id;
        UPDATE conversation_sizes SET tokens = tokens + v_delta WHERE appid = v_appid;
    END IF;
    RETURN 'learned';
END
$$;

-- End a turn in one transaction (as 0002's end_turn), and keep the token counts: the reply
-- costs Ollama's eval_count (else its estimate); p_prompt_tokens (Ollama's
-- prompt_eval_count for the prompt this turn sent) teaches the counts of what it sent.
-- Idempotent, as before.
CREATE FUNCTION end_turn(p_turn bigint, p_status text, p_error text, p_content text,
                         p_extra jsonb, p_model text, p_tokens integer, p_reply boolean,
                         p_prompt_tokens integer)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_appid text;
    v_learned text;
    v_size record;
BEGIN
    SELECT status, appid INTO v_status, v_appid FROM turns WHERE id = p_turn FOR UPDATE;
    IF v_status IS NULL THEN
        RETURN 'lost';
    ELSIF v_status <> 'running' THEN
        RETURN CASE WHEN v_status = p_status THEN 'already' ELSE 'lost' END;
    END IF;
    UPDATE turns SET status = p_status, error = p_error, ended_at = now(),
                     prompt_tokens = p_prompt_tokens
     WHERE id = p_turn;
    IF p_status IN ('complete', 'interrupted', 'failed') AND p_prompt_tokens IS NOT NULL THEN
        v_learned := learn_tokens(p_turn, p_prompt_tokens);
        IF v_learned = 'suspect' THEN
            UPDATE turns SET error = coalesce(error || '; ', '')
                || 'Ollama counted fewer prompt tokens than were sent: it may have cut the prompt'
             WHERE id = p_turn;
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
    IF p_status IN ('complete', 'interrupted', 'failed') THEN
        SELECT * INTO v_size FROM turn_size(p_turn);
        UPDATE turns SET tokens = v_size.tokens, nmessages = v_size.nmessages WHERE id = p_turn;
        INSERT INTO conversation_sizes AS c (appid, messages, tokens)
        SELECT v_appid, count(*), coalesce(sum(ntokens), 0) FROM messages
         WHERE turn_id = p_turn AND is_sent(status, content, extra)
        ON CONFLICT (appid) DO UPDATE
            SET messages = c.messages + EXCLUDED.messages, tokens = c.tokens + EXCLUDED.tokens;
    END IF;
    DELETE FROM leases WHERE appid = v_appid AND turn_id = p_turn;
    RETURN CASE WHEN v_learned = 'suspect' THEN 'stored-suspect' ELSE 'stored' END;
END
$$;

-- 0002's signature, for callers that have no prompt count.
CREATE OR REPLACE FUNCTION end_turn(p_turn bigint, p_status text, p_error text, p_content text,
                                    p_extra jsonb, p_model text, p_tokens integer,
                                    p_reply boolean)
RETURNS text
LANGUAGE sql AS $$
    SELECT end_turn(p_turn, p_status, p_error, p_content, p_extra, p_model, p_tokens, p_reply,
                    NULL::integer)
$$;

-- Resolve unqualified names in chatterd's schema whoever calls (see 0003).
-- (estimate_tokens and is_sent read no table: without a SET clause they stay inlinable,
-- which matters, as they run for every message a turn reads.)
ALTER FUNCTION turn_size(bigint) SET search_path FROM CURRENT;
ALTER FUNCTION begin_turn(text, text, double precision, jsonb, boolean, double precision,
                          integer, integer) SET search_path FROM CURRENT;
ALTER FUNCTION sent_by(bigint) SET search_path FROM CURRENT;
ALTER FUNCTION learn_tokens(bigint, integer) SET search_path FROM CURRENT;
ALTER FUNCTION end_turn(bigint, text, text, text, jsonb, text, integer, boolean, integer)
    SET search_path FROM CURRENT;
ALTER FUNCTION end_turn(bigint, text, text, text, jsonb, text, integer, boolean)
    SET search_path FROM CURRENT;

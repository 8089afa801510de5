-- What turn p_turn of owner p_owner_id sent: the system prompts, the messages of the earlier turns in its
-- window_turns, and its own messages (its reply excluded when called before the reply is
-- stored).  The work is bounded by what was sent: the window's messages are read in one
-- index scan (owner_id and turn_id = ANY(window_turns)); every part names the owner.  `est` is each message's estimate, `ntokens`
-- its count as known (learned, else estimated).
--
-- No SET clause: a SQL function with one is planned again on every call and is never
-- inlined.  Its caller (learn_tokens) runs with chatterd's search_path, which resolves
-- its table names.
DROP FUNCTION IF EXISTS sent_by(bigint);
CREATE OR REPLACE FUNCTION sent_by(p_owner_id bigint, p_turn bigint)
RETURNS TABLE (seq bigint, turn_id bigint, ntokens integer, ntokens_from text, est integer)
LANGUAGE sql STABLE AS $$
    WITH t0 AS (SELECT appid, window_turns FROM turns WHERE owner_id = p_owner_id AND id = p_turn)
    SELECT m.seq, m.turn_id, coalesce(m.ntokens, estimate_tokens(m.content, m.extra)),
           m.ntokens_from, estimate_tokens(m.content, m.extra)
      FROM t0, messages m JOIN turns t ON t.owner_id = m.owner_id AND t.id = m.turn_id
     WHERE m.owner_id = p_owner_id AND m.appid = t0.appid AND m.role = 'system'
       AND m.turn_id < p_turn
       AND t.status IN ('complete', 'interrupted', 'failed') AND NOT t.unanswered
    UNION ALL
    SELECT m.seq, m.turn_id, coalesce(m.ntokens, estimate_tokens(m.content, m.extra)),
           m.ntokens_from, estimate_tokens(m.content, m.extra)
      FROM t0, messages m
     WHERE m.owner_id = p_owner_id AND m.appid = t0.appid AND m.turn_id = ANY(t0.window_turns)
       AND m.role <> 'system' AND is_sent(m.status, m.content, m.extra)
    UNION ALL
    SELECT m.seq, m.turn_id, coalesce(m.ntokens, estimate_tokens(m.content, m.extra)),
           m.ntokens_from, estimate_tokens(m.content, m.extra)
      FROM messages m WHERE m.owner_id = p_owner_id AND m.turn_id = p_turn
$$;

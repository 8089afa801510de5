-- A turn's `tokens` and `nmessages` (turn p_turn of owner p_owner_id): the counts of its sent, non-system messages (system
-- prompts are always sent, so a turn's size leaves them out).  For turns stored without
-- these totals (rows written by other means) and for totals to redo after learn_tokens.
--
-- No SET clause: a SQL function with one is planned again on every call and is never
-- inlined.  Its callers (begin_turn, end_turn, learn_tokens) run with chatterd's
-- search_path, which resolves its table names.
DROP FUNCTION IF EXISTS turn_size(bigint);
CREATE OR REPLACE FUNCTION turn_size(p_owner_id bigint, p_turn bigint,
                                     OUT tokens integer, OUT nmessages integer)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(coalesce(ntokens, estimate_tokens(content, extra))), 0)::integer,
           count(*)::integer
      FROM messages WHERE owner_id = p_owner_id AND turn_id = p_turn AND role <> 'system'
                      AND is_sent(status, content, extra)
$$;

-- Title owner p_owner_id's conversation p_appid (PATCH /conversations/{appID},
-- db/conversation_records.py); p_title NULL removes the title.  Returns the conversation's
-- row as GET /conversations lists it, or no row when the owner has no conversation under
-- this appID.  The title does not change updated_at (when a turn last entered it), so
-- naming a conversation does not move it in the list.
--
-- A conversation whose size was never counted (rows written by other means, e.g. a course
-- import after turns that were never counted) has no row until its next turn: it gets one
-- here, counted as begin_turn counts it.
CREATE OR REPLACE FUNCTION set_conversation_title(p_owner_id bigint, p_appid text, p_title text)
RETURNS TABLE (appid text, title text, model text, messages bigint, updated_at timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE conversation_sizes s SET title = p_title
     WHERE s.owner_id = p_owner_id AND s.appid = p_appid
    RETURNING s.appid, s.title, s.model, s.messages, s.updated_at;
    IF FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO conversation_sizes AS s (owner_id, appid, messages, tokens, title, model, updated_at)
    SELECT p_owner_id, p_appid,
           count(*) FILTER (WHERE is_sent(m.status, m.content, m.extra) AND NOT t.unanswered),
           coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra)))
                    FILTER (WHERE is_sent(m.status, m.content, m.extra) AND NOT t.unanswered), 0),
           p_title,
           (array_agg(m.model ORDER BY m.seq DESC) FILTER (WHERE m.model IS NOT NULL))[1],
           max(t.ended_at)
      FROM turns t JOIN messages m ON m.owner_id = t.owner_id AND m.turn_id = t.id
     WHERE t.owner_id = p_owner_id AND t.appid = p_appid AND m.owner_id = p_owner_id
       AND t.status IN ('complete', 'interrupted', 'failed')
    HAVING count(*) > 0
    ON CONFLICT (owner_id, appid) DO UPDATE SET title = EXCLUDED.title
    RETURNING s.appid, s.title, s.model, s.messages, s.updated_at;
END
$$;

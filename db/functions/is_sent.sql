-- Whether a stored message is sent to the model: a reply that ended with neither text nor
-- tool calls is left out (it would only show the model an empty assistant message).
--
-- No SET clause and no table read, so PostgreSQL inlines it into the statements that call
-- it: it runs for every message a turn reads.
CREATE OR REPLACE FUNCTION is_sent(p_status text, p_content text, p_extra jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_status = 'complete' OR p_content <> '' OR coalesce(p_extra ? 'tool_calls', false)
$$;

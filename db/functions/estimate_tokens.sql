-- What a message costs in a prompt before Ollama has counted it: 4 tokens of template per
-- message, a token per 4 bytes of UTF-8 (bytes, not characters: a CJK character is 3 bytes
-- and about one token), the tool calls' JSON likewise, and 768 per image.
--
-- No SET clause and no table read, so PostgreSQL inlines it into the statements that call
-- it: it runs for every message a turn reads.
CREATE OR REPLACE FUNCTION estimate_tokens(p_content text, p_extra jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT 4 + ceil(octet_length(coalesce(p_content, '')) / 4.0)::integer
             + coalesce(ceil(octet_length((p_extra -> 'tool_calls')::text) / 4.0)::integer, 0)
             + CASE WHEN jsonb_typeof(p_extra -> 'images') = 'array'
                    THEN 768 * jsonb_array_length(p_extra -> 'images') ELSE 0 END
$$;

-- Store p_messages ([{role, content, extra, model, tokens}]) in turn p_turn of owner
-- p_owner_id's conversation p_appid, in order: the
-- messages of a turn's tool rounds (/llmtools), which end_turn stores with the turn.  An
-- assistant message costs its eval_count (`tokens`) when known, anything else its estimate
-- until learn_tokens learns better.
DROP FUNCTION IF EXISTS store_turn_messages(bigint, text, jsonb);
CREATE OR REPLACE FUNCTION store_turn_messages(p_owner_id bigint, p_turn bigint, p_appid text,
                                               p_messages jsonb)
RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    INSERT INTO messages (owner_id, appid, turn_id, role, content, extra, status, model, tokens,
                          ntokens, ntokens_from)
    SELECT p_owner_id, p_appid, p_turn, e.m->>'role', e.m->>'content', nullif(e.m->'extra', 'null'::jsonb),
           'complete', e.m->>'model', (e.m->>'tokens')::integer,
           CASE WHEN e.m->>'role' = 'assistant' AND jsonb_typeof(e.m->'tokens') = 'number'
                THEN (e.m->>'tokens')::integer
                ELSE estimate_tokens(e.m->>'content', nullif(e.m->'extra', 'null'::jsonb)) END,
           CASE WHEN e.m->>'role' = 'assistant' AND jsonb_typeof(e.m->'tokens') = 'number'
                THEN 'ollama' ELSE 'estimate' END
      FROM jsonb_array_elements(coalesce(p_messages, '[]'::jsonb)) WITH ORDINALITY AS e(m, i)
     ORDER BY e.i
$$;

-- Tool rounds (/llmtools): one turn may hold several assistant and tool messages.  When
-- the model calls one of chatterd's resident tools, chatterd runs it and asks again, in
-- the same turn: the turn is then its incoming messages, each round's assistant message
-- with its `tool_calls` followed by the tool results, and the last reply.  They are kept
-- in memory while the turn runs (pending, like the turn) and enter the conversation with
-- it, in end_turn's one transaction: a turn that is rejected or abandoned leaves nothing,
-- and what is stored is made of whole call + result pairs.

-- Store p_messages ([{role, content, extra, model, tokens}]) in turn p_turn, in order,
-- with their token counts as 0005 keeps them: an assistant message costs its eval_count
-- (`tokens`) when known, anything else its estimate until Ollama teaches us better.
CREATE FUNCTION store_turn_messages(p_turn bigint, p_appid text, p_messages jsonb)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO messages (appid, turn_id, role, content, extra, status, model, tokens,
                          ntokens, ntokens_from)
    SELECT p_appid, p_turn, e.m->>'role', e.m->>'content', nullif(e.m->'extra', 'null'::jsonb),
           'complete', e.m->>'model', (e.m->>'tokens')::integer,
           CASE WHEN e.m->>'role' = 'assistant' AND jsonb_typeof(e.m->'tokens') = 'number'
                THEN (e.m->>'tokens')::integer
                ELSE estimate_tokens(e.m->>'content', nullif(e.m->'extra', 'null'::jsonb)) END,
           CASE WHEN e.m->>'role' = 'assistant' AND jsonb_typeof(e.m->'tokens') = 'number'
                THEN 'ollama' ELSE 'estimate' END
      FROM jsonb_array_elements(coalesce(p_messages, '[]'::jsonb)) WITH ORDINALITY AS e(m, i)
     ORDER BY e.i
$$;

-- End a turn (as 0005's end_turn) with the messages of its tool rounds:
--   p_before: the earlier rounds (assistant tool_calls message, tool results, ...), stored
--             after the incoming messages and before the reply.  They were all sent in
--             the last round's prompt, so p_prompt_tokens (that round's
--             prompt_eval_count) teaches their counts too (learn_tokens runs after they
--             are stored and before the reply is);
--   p_after:  the results of the tools the reply itself called (stored after it), e.g.
--             chatterd's own tools when the reply also called a client's tool.
-- Idempotent like end_turn: nothing is stored when the turn is no longer running; one
-- transaction.  A turn that did not enter the conversation (rejected) stores neither.
CREATE FUNCTION end_turn(p_turn bigint, p_status text, p_error text, p_content text,
                         p_extra jsonb, p_model text, p_tokens integer, p_reply boolean,
                         p_prompt_tokens integer, p_before jsonb, p_after jsonb)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_appid text;
    v_result text;
    v_old record;
    v_size record;
BEGIN
    -- Most turns have no tool rounds: then this is plain end_turn.
    IF jsonb_array_length(coalesce(p_before, '[]'::jsonb)) > 0 THEN
        SELECT status, appid INTO v_status, v_appid FROM turns WHERE id = p_turn FOR UPDATE;
        IF v_status = 'running' AND p_status IN ('complete', 'interrupted', 'failed') THEN
            PERFORM store_turn_messages(p_turn, v_appid, p_before);
        END IF;
    END IF;
    v_result := end_turn(p_turn, p_status, p_error, p_content, p_extra, p_model, p_tokens,
                         p_reply, p_prompt_tokens);
    IF v_result LIKE 'stored%' AND p_status IN ('complete', 'interrupted', 'failed')
       AND jsonb_array_length(coalesce(p_after, '[]'::jsonb)) > 0 THEN
        SELECT appid INTO v_appid FROM turns WHERE id = p_turn;
        SELECT tokens, nmessages INTO v_old FROM turns WHERE id = p_turn;
        PERFORM store_turn_messages(p_turn, v_appid, p_after);
        SELECT * INTO v_size FROM turn_size(p_turn);
        UPDATE turns SET tokens = v_size.tokens, nmessages = v_size.nmessages WHERE id = p_turn;
        -- Tool results are never system prompts, so the conversation grows by the same.
        UPDATE conversation_sizes
           SET messages = messages + v_size.nmessages - v_old.nmessages,
               tokens = tokens + v_size.tokens - v_old.tokens
         WHERE appid = v_appid;
    END IF;
    RETURN v_result;
END
$$;

-- Resolve unqualified names in chatterd's schema whoever calls (see 0003).
ALTER FUNCTION store_turn_messages(bigint, text, jsonb) SET search_path FROM CURRENT;
ALTER FUNCTION end_turn(bigint, text, text, text, jsonb, text, integer, boolean, integer, jsonb,
                        jsonb) SET search_path FROM CURRENT;

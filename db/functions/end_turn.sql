-- End a turn in one transaction: its status, its reply (if any), its token counts, its
-- conversation's size and row (the model of its latest reply, when it last changed), and its
-- lease released.  Called by db/conversations.py end_turn (and ready_connection).  A turn is
-- found by its owner and id (p_owner_id, p_turn): with another owner it is not there, and
-- the answer is 'lost'.
--
-- Idempotent, so a retry after an ambiguous failure never stores the reply twice: returns
-- 'stored' = done now, 'stored-suspect' = done now, but Ollama counted fewer prompt tokens
-- than are known to have been sent (it must have cut the prompt; the turn's error says so),
-- 'already' = an earlier attempt did it, 'lost' = the turn was abandoned meanwhile (its
-- lease expired and another turn took it).
--
-- A turn that ended before any answer text -- failed or interrupted with neither text nor a
-- tool call in its reply -- is kept as a record (`unanswered`: its status, messages, tool
-- rounds and error stay, for a resend and for the conversations API) but never enters the
-- conversation: later turns never send its messages, which would leave its user message
-- (or its last tool results) without a reply, and two user messages in a row are what
-- many chat templates refuse.  A resend of it is a new turn.  A turn that failed after
-- answer text enters whole, with what was said.
--
-- The reply costs Ollama's eval_count (p_tokens) when complete, else its estimate;
-- p_prompt_tokens (Ollama's prompt_eval_count for the prompt this turn sent) teaches the
-- counts of what it sent (learn_tokens).  The turn row is written once.  A released lease
-- keeps its row, expired at -infinity, so the next turn's upsert updates it in place (no
-- index churn per turn).  Unlike begin_turn's, this commit waits for the WAL flush: `done`
-- means stored.
DROP FUNCTION IF EXISTS end_turn(bigint, text, text, text, jsonb, text, integer, boolean, integer);
DROP FUNCTION IF EXISTS end_turn(bigint, text, text, text, jsonb, text, integer, boolean, integer,
                                 jsonb, jsonb);
CREATE OR REPLACE FUNCTION end_turn(p_owner_id bigint, p_turn bigint, p_status text, p_error text,
                                    p_content text, p_extra jsonb, p_model text, p_tokens integer,
                                    p_reply boolean, p_prompt_tokens integer)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
    v_appid text;
    v_learned text;
    v_error text := p_error;
    v_tokens integer;
    v_n integer;
    v_ended boolean := p_status IN ('complete', 'interrupted', 'failed');
    v_unanswered boolean := p_status IN ('failed', 'interrupted')
        AND NOT (p_reply AND (coalesce(p_content, '') <> ''
                              OR coalesce(p_extra ? 'tool_calls', false)));
BEGIN
    SELECT status, appid INTO v_status, v_appid FROM turns
     WHERE owner_id = p_owner_id AND id = p_turn FOR UPDATE;
    IF v_status IS NULL THEN
        RETURN 'lost';
    ELSIF v_status <> 'running' THEN
        RETURN CASE WHEN v_status = p_status THEN 'already' ELSE 'lost' END;
    END IF;
    IF v_ended AND p_prompt_tokens IS NOT NULL THEN
        v_learned := learn_tokens(p_owner_id, p_turn, p_prompt_tokens);
        IF v_learned = 'suspect' THEN
            v_error := coalesce(v_error || '; ', '')
                || 'Ollama counted fewer prompt tokens than were sent: it may have cut the prompt';
        END IF;
    END IF;
    IF p_reply THEN
        INSERT INTO messages (owner_id, appid, turn_id, role, content, extra, status, error, model,
                              tokens, ntokens, ntokens_from)
        VALUES (p_owner_id, v_appid, p_turn, 'assistant', p_content, p_extra,
                CASE WHEN p_status = 'rejected' THEN 'failed' ELSE p_status END,
                p_error, p_model, p_tokens,
                CASE WHEN p_tokens IS NOT NULL AND p_status = 'complete' THEN p_tokens
                     ELSE estimate_tokens(p_content, p_extra) END,
                CASE WHEN p_tokens IS NOT NULL AND p_status = 'complete' THEN 'ollama'
                     ELSE 'estimate' END);
    END IF;
    IF v_unanswered THEN
        v_tokens := 0;  -- nothing of it is sent, and its conversation does not grow
        v_n := 0;
    ELSIF v_ended THEN
        -- turn_size(p_turn), written out: a SQL function that is not inlined is planned
        -- again on every call.
        SELECT coalesce(sum(coalesce(m.ntokens, estimate_tokens(m.content, m.extra))), 0)::integer,
               count(*)::integer
          INTO v_tokens, v_n
          FROM messages m
         WHERE m.owner_id = p_owner_id AND m.turn_id = p_turn AND m.role <> 'system'
           AND is_sent(m.status, m.content, m.extra);
        INSERT INTO conversation_sizes AS c (owner_id, appid, messages, tokens, model)
        SELECT p_owner_id, v_appid, count(*), coalesce(sum(ntokens), 0),
               CASE WHEN p_reply THEN p_model END
          FROM messages
         WHERE owner_id = p_owner_id AND turn_id = p_turn AND is_sent(status, content, extra)
        ON CONFLICT (owner_id, appid) DO UPDATE
            SET messages = c.messages + EXCLUDED.messages, tokens = c.tokens + EXCLUDED.tokens,
                model = coalesce(EXCLUDED.model, c.model), updated_at = now();
    END IF;
    UPDATE turns SET status = p_status, error = v_error, ended_at = now(),
                     prompt_tokens = p_prompt_tokens,
                     tokens = coalesce(v_tokens, tokens), nmessages = coalesce(v_n, nmessages),
                     unanswered = v_unanswered
     WHERE owner_id = p_owner_id AND id = p_turn;
    UPDATE leases SET expires_at = '-infinity'
     WHERE owner_id = p_owner_id AND appid = v_appid AND turn_id = p_turn;
    RETURN CASE WHEN v_learned = 'suspect' THEN 'stored-suspect' ELSE 'stored' END;
END
$$;

-- The same, with the messages of the turn's tool rounds (/llmtools):
--   p_before: the earlier rounds (assistant tool_calls message, tool results, ...), stored
--             after the incoming messages and before the reply.  They were all sent in the
--             last round's prompt, so p_prompt_tokens (that round's prompt_eval_count)
--             teaches their counts too (learn_tokens runs after they are stored and before
--             the reply is);
--   p_after:  the results of the tools the reply itself called (stored after it), e.g.
--             chatterd's own tools when the reply also called a client's tool.
-- They enter the conversation with the turn: nothing is stored when the turn is no longer
-- running, and a turn that did not enter the conversation (rejected) stores neither, so
-- what is stored is made of whole call + result pairs.
CREATE OR REPLACE FUNCTION end_turn(p_owner_id bigint, p_turn bigint, p_status text, p_error text,
                                    p_content text, p_extra jsonb, p_model text, p_tokens integer,
                                    p_reply boolean, p_prompt_tokens integer,
                                    p_before jsonb, p_after jsonb)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
    v_appid text;
    v_result text;
    v_old record;
    v_size record;
BEGIN
    -- Most turns have no tool rounds: then this is plain end_turn.
    IF jsonb_array_length(coalesce(p_before, '[]'::jsonb)) > 0 THEN
        SELECT status, appid INTO v_status, v_appid FROM turns
         WHERE owner_id = p_owner_id AND id = p_turn FOR UPDATE;
        IF v_status = 'running' AND p_status IN ('complete', 'interrupted', 'failed') THEN
            PERFORM store_turn_messages(p_owner_id, p_turn, v_appid, p_before);
        END IF;
    END IF;
    v_result := end_turn(p_owner_id, p_turn, p_status, p_error, p_content, p_extra, p_model, p_tokens,
                         p_reply, p_prompt_tokens);
    IF v_result LIKE 'stored%' AND p_status IN ('complete', 'interrupted', 'failed')
       AND jsonb_array_length(coalesce(p_after, '[]'::jsonb)) > 0 THEN
        SELECT appid INTO v_appid FROM turns WHERE owner_id = p_owner_id AND id = p_turn;
        SELECT tokens, nmessages INTO v_old FROM turns WHERE owner_id = p_owner_id AND id = p_turn;
        PERFORM store_turn_messages(p_owner_id, p_turn, v_appid, p_after);
        SELECT * INTO v_size FROM turn_size(p_owner_id, p_turn);
        UPDATE turns SET tokens = v_size.tokens, nmessages = v_size.nmessages
         WHERE owner_id = p_owner_id AND id = p_turn;
        -- Tool results are never system prompts, so the conversation grows by the same.
        UPDATE conversation_sizes
           SET messages = messages + v_size.nmessages - v_old.nmessages,
               tokens = tokens + v_size.tokens - v_old.tokens
         WHERE owner_id = p_owner_id AND appid = v_appid;
    END IF;
    RETURN v_result;
END
$$;

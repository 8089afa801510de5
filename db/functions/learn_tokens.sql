-- Learn token counts from Ollama's prompt_eval_count for what turn p_turn of owner
-- p_owner_id sent (end_turn calls it before the turn's reply is stored).  Every message has `ntokens`, what it costs
-- in a prompt: first an estimate (estimate_tokens), then a count learned here
-- (`ntokens_from`: 'ollama' = exactly Ollama's count, 'shared' = an exact total of several
-- messages, shared in proportion to their estimates).
--
-- The messages whose count is already learned are subtracted, and what remains is the
-- count of the others.  The usual turn has one such message (the new user message): it
-- gets the whole remainder, written directly, marked 'ollama', with no second pass over
-- what the turn sent.  Several (the first turn after /llmprep shares with the system
-- prompt) share it in proportion to their estimates, marked 'shared'.  Nothing is learned
-- when the remainder is implausible (under one token per message: the model changed, or
-- Ollama cut the prompt) or the prompt filled the context.
--
-- Returns 'learned', 'skipped' or 'suspect' (the count is below what is known to have been
-- sent: Ollama must have cut the prompt).  An earlier turn whose message was learned gets
-- its totals (turns.tokens, nmessages) and its conversation's size redone; this turn's own
-- are counted when it ends.
DROP FUNCTION IF EXISTS learn_tokens(bigint, integer);
CREATE OR REPLACE FUNCTION learn_tokens(p_owner_id bigint, p_turn bigint, p_prompt_tokens integer)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_appid text;
    v_ctx integer;
    v_known bigint;
    v_unknown_n integer;
    v_unknown_est bigint;
    v_one_seq bigint;      -- with one unknown message: it,
    v_one_turn bigint;     -- the turn it belongs to,
    v_one_old integer;     -- and its count so far
    v_rest bigint;
    v_delta bigint;
    v_turns bigint[];
BEGIN
    SELECT appid, context_tokens INTO v_appid, v_ctx FROM turns
     WHERE owner_id = p_owner_id AND id = p_turn;
    SELECT coalesce(sum(s.ntokens) FILTER (WHERE s.ntokens_from <> 'estimate'), 0),
           count(*) FILTER (WHERE s.ntokens_from = 'estimate'),
           coalesce(sum(s.est) FILTER (WHERE s.ntokens_from = 'estimate'), 0),
           max(s.seq) FILTER (WHERE s.ntokens_from = 'estimate'),
           max(s.turn_id) FILTER (WHERE s.ntokens_from = 'estimate'),
           max(s.ntokens) FILTER (WHERE s.ntokens_from = 'estimate')
      INTO v_known, v_unknown_n, v_unknown_est, v_one_seq, v_one_turn, v_one_old
      FROM sent_by(p_owner_id, p_turn) s;
    v_rest := p_prompt_tokens - v_known;
    IF v_rest < 0 THEN
        RETURN 'suspect';
    END IF;
    IF v_unknown_n = 0 OR v_rest < v_unknown_n
       OR (v_ctx IS NOT NULL AND p_prompt_tokens >= v_ctx) THEN
        RETURN 'skipped';
    END IF;
    IF v_unknown_n = 1 THEN
        UPDATE messages SET ntokens = v_rest, ntokens_from = 'ollama'
         WHERE owner_id = p_owner_id AND seq = v_one_seq;
        IF v_one_turn <> p_turn THEN  -- an earlier turn's message: its totals, and the
            UPDATE turns t SET tokens = s.tokens, nmessages = s.nmessages  -- conversation's
              FROM turn_size(p_owner_id, v_one_turn) s
             WHERE t.owner_id = p_owner_id AND t.id = v_one_turn;
            UPDATE conversation_sizes SET tokens = tokens + (v_rest - v_one_old)
             WHERE owner_id = p_owner_id AND appid = v_appid;
        END IF;
        RETURN 'learned';
    END IF;
    -- Shares by cumulative rounding, so they add up to v_rest exactly.
    WITH u AS (
        SELECT s.seq, s.turn_id, s.ntokens AS old, s.est,
               sum(s.est) OVER (ORDER BY s.seq) AS upto
          FROM sent_by(p_owner_id, p_turn) s WHERE s.ntokens_from = 'estimate'),
    shares AS (
        SELECT u.seq, u.turn_id, u.old,
               (floor(v_rest::numeric * u.upto / v_unknown_est)
                - floor(v_rest::numeric * (u.upto - u.est) / v_unknown_est))::integer AS share
          FROM u),
    changed AS (
        UPDATE messages m SET ntokens = s.share, ntokens_from = 'shared'
          FROM shares s WHERE m.owner_id = p_owner_id AND m.seq = s.seq
        RETURNING s.turn_id, s.share - s.old AS delta)
    SELECT coalesce(sum(c.delta) FILTER (WHERE c.turn_id <> p_turn), 0),
           array_agg(DISTINCT c.turn_id) FILTER (WHERE c.turn_id <> p_turn)
      INTO v_delta, v_turns FROM changed c;
    IF v_turns IS NOT NULL THEN
        UPDATE turns t SET tokens = s.tokens, nmessages = s.nmessages
          FROM unnest(v_turns) AS d(id), LATERAL turn_size(p_owner_id, d.id) s
         WHERE t.owner_id = p_owner_id AND t.id = d.id;
        UPDATE conversation_sizes SET tokens = tokens + v_delta
         WHERE owner_id = p_owner_id AND appid = v_appid;
    END IF;
    RETURN 'learned';
END
$$;

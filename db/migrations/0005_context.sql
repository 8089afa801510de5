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

ALTER TABLE messages
    ADD COLUMN ntokens integer,
    ADD COLUMN ntokens_from text NOT NULL DEFAULT 'estimate'
        CHECK (ntokens_from IN ('estimate', 'ollama', 'shared'));
-- The backfills below compute what estimate_tokens and is_sent (db/functions/) compute,
-- written out: versioned migrations run before the function files are applied.
UPDATE messages SET
    ntokens = CASE WHEN role = 'assistant' AND tokens IS NOT NULL THEN tokens
                   ELSE 4 + ceil(octet_length(coalesce(content, '')) / 4.0)::integer
                        + coalesce(ceil(octet_length((extra -> 'tool_calls')::text) / 4.0)::integer, 0)
                        + CASE WHEN jsonb_typeof(extra -> 'images') = 'array'
                               THEN 768 * jsonb_array_length(extra -> 'images') ELSE 0 END
              END,
    ntokens_from = CASE WHEN role = 'assistant' AND tokens IS NOT NULL THEN 'ollama'
                        ELSE 'estimate' END;
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
         WHERE role <> 'system'
           AND (status = 'complete' OR content <> '' OR coalesce(extra ? 'tool_calls', false))
         GROUP BY turn_id) s
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
 WHERE t.status IN ('complete', 'interrupted', 'failed')
   AND (m.status = 'complete' OR m.content <> '' OR coalesce(m.extra ? 'tool_calls', false))
 GROUP BY m.appid;

-- A turn that ended before any answer text (failed, or interrupted, with neither text nor a
-- tool call in its reply) is a record only: it keeps its status, messages and error (a
-- resend, the conversations API), but is never part of the conversation, so later turns
-- never send its messages (a lone user message, then the next turn's: two user messages in
-- a row, which many chat templates refuse).  The functions read it as `NOT unanswered`
-- next to the ended statuses (db/functions/end_turn.sql sets it).
ALTER TABLE turns ADD COLUMN unanswered boolean NOT NULL DEFAULT false;

-- Turns stored so before this version: marked, sizes zeroed, and their sent messages taken
-- out of their conversation's size (conversation_sizes counts what end_turn added: every
-- sent message, system prompts included; a message is sent unless it is a reply that ended
-- with neither text nor tool calls).  The reply row carries its turn's status; incoming
-- messages and tool rounds are 'complete'.  A conversation is its appID here, and also its
-- owner_id once 0021 has added that column (compared through to_jsonb, so this reads the
-- same either way).
WITH marked AS (
    UPDATE turns t SET unanswered = true, tokens = 0, nmessages = 0
     WHERE t.status IN ('failed', 'interrupted')
       AND NOT EXISTS (SELECT 1 FROM messages m
                        WHERE m.turn_id = t.id AND m.status = t.status
                          AND (m.content <> '' OR coalesce(m.extra ? 'tool_calls', false)))
    RETURNING t.id, t.appid, to_jsonb(t) -> 'owner_id' AS owner_key),
unsent AS (
    SELECT marked.appid, marked.owner_key, count(*) AS messages,
           coalesce(sum(m.ntokens), 0) AS tokens
      FROM marked JOIN messages m ON m.turn_id = marked.id
     WHERE m.status = 'complete' OR m.content <> '' OR coalesce(m.extra ? 'tool_calls', false)
     GROUP BY marked.appid, marked.owner_key)
UPDATE conversation_sizes c
   SET messages = greatest(c.messages - u.messages, 0), tokens = greatest(c.tokens - u.tokens, 0)
  FROM unsent u
 WHERE c.appid = u.appid AND to_jsonb(c) -> 'owner_id' IS NOT DISTINCT FROM u.owner_key;

-- Conversations that became one turn each: every course import before this version stored
-- an appID's imported rows as one turn, and 0002 made each conversation stored before turns
-- existed one turn.  The context budget sends whole turns only, so such a turn larger than
-- the budget was never sent, not even its newest messages.  Each is split the way chatterd
-- stores turns (and the course import now does): a new turn at each user message that
-- follows a message of another role (the user messages of one request stay together), so
-- an assistant's tool calls stay in the turn with their results.
--
-- Turn ids are the conversation's order, and a split turn needs more ids than it had: its
-- parts and every later turn of its appID get new ids from turn_ids, in the same order.
-- Each message keeps its row (seq, content, everything); only its turn_id changes.  The
-- history cache of a running process never holds a moved turn's old id again (it is gone).
-- A conversation is an appID here (owners come with 0021); after 0021, the later turns of
-- another owner's conversation of the same appID would move too, their order kept.

-- Every message of a candidate turn, with the part it falls in: 1, 2, ... (messages before
-- the first user message are in part 1 with it).
CREATE TEMP TABLE split_messages ON COMMIT DROP AS
SELECT seq, turn_id, greatest(sum(starts) OVER (PARTITION BY turn_id ORDER BY seq), 1) AS part
  FROM (SELECT m.seq, m.turn_id,
               (m.role = 'user' AND lag(m.role) OVER (PARTITION BY m.turn_id ORDER BY m.seq)
                                    IS DISTINCT FROM 'user')::integer AS starts
          FROM messages m JOIN turns t ON t.id = m.turn_id
         WHERE t.status = 'complete' AND (t.owner IS NULL OR t.owner LIKE 'course import %')) s;

-- The turns that move: each split turn (one row per part) and every later turn of its appID
-- (one row each), numbered in conversation order.
CREATE TEMP TABLE split_turns ON COMMIT DROP AS
WITH split AS (
    SELECT turn_id, max(part) AS parts FROM split_messages GROUP BY turn_id HAVING max(part) > 1),
first AS (
    SELECT t.appid, min(t.id) AS id FROM turns t JOIN split s ON s.turn_id = t.id GROUP BY t.appid)
SELECT t.id AS old_id, p.part, s.turn_id IS NOT NULL AS split,
       row_number() OVER (ORDER BY t.id, p.part) AS k, NULL::bigint AS new_id
  FROM turns t JOIN first f ON f.appid = t.appid AND t.id >= f.id
  LEFT JOIN split s ON s.turn_id = t.id
 CROSS JOIN LATERAL generate_series(1, coalesce(s.parts, 1)) AS p(part);

-- New ids, increasing in the order above (a sequence's values only grow, whoever else draws
-- from it meanwhile).
UPDATE split_turns st SET new_id = i.id
  FROM (SELECT row_number() OVER (ORDER BY id) AS k, id
          FROM (SELECT nextval('turn_ids') AS id FROM split_turns) drawn) i
 WHERE i.k = st.k;

-- The new turn rows: copies (every column; a split part's counts are set below).
INSERT INTO turns
SELECT (jsonb_populate_record(t, jsonb_build_object('id', st.new_id))).*
  FROM split_turns st JOIN turns t ON t.id = st.old_id;

-- Messages follow their turn (and a split turn's, their part).
UPDATE messages m SET turn_id = st.new_id
  FROM split_turns st
 WHERE m.turn_id = st.old_id AND NOT st.split;
UPDATE messages m SET turn_id = st.new_id
  FROM split_messages sm JOIN split_turns st ON st.old_id = sm.turn_id AND st.part = sm.part
 WHERE m.seq = sm.seq AND st.split;

-- What pointed at a moved turn points at its new id: a lease, and the record of which earlier
-- turns a turn sent (a split turn sent whole means all of its parts).
UPDATE leases l SET turn_id = st.new_id
  FROM split_turns st WHERE l.turn_id = st.old_id AND st.part = 1;
UPDATE turns t SET window_turns = w.ids, window_from = w.first
  FROM (SELECT t2.id,
               array_agg(coalesce(st.new_id, e.id) ORDER BY e.n, st.part DESC) AS ids,
               min(coalesce(st.new_id, e.id)) FILTER (WHERE e.id = t2.window_from) AS first
          FROM turns t2 CROSS JOIN LATERAL unnest(t2.window_turns) WITH ORDINALITY AS e(id, n)
          LEFT JOIN split_turns st ON st.old_id = e.id
         WHERE t2.id IN (SELECT new_id FROM split_turns)
         GROUP BY t2.id) w
 WHERE t.id = w.id;

DELETE FROM turns WHERE id IN (SELECT old_id FROM split_turns);

-- A part as end_turn would have stored it: it started with its first message, its counts
-- are the tokens and number of its sent non-system messages (the count learned from the
-- model, else estimate_tokens()'s estimate; a message is sent unless it is a reply that
-- ended with neither text nor tool calls), and it continues the turn before when it starts
-- with a tool result.
UPDATE turns t
   SET started_at = s.started_at, tokens = s.tokens, nmessages = s.nmessages,
       continues = s.continues
  FROM (SELECT st.new_id,
               min(m.created_at) AS started_at,
               coalesce(sum(coalesce(m.ntokens,
                   4 + ceil(octet_length(coalesce(m.content, '')) / 4.0)::integer
                     + coalesce(ceil(octet_length((m.extra -> 'tool_calls')::text) / 4.0)::integer, 0)
                     + CASE WHEN jsonb_typeof(m.extra -> 'images') = 'array'
                            THEN 768 * jsonb_array_length(m.extra -> 'images') ELSE 0 END))
                   FILTER (WHERE m.role <> 'system' AND (m.status = 'complete' OR m.content <> ''
                                                         OR coalesce(m.extra ? 'tool_calls', false))),
                   0)::integer AS tokens,
               count(*) FILTER (WHERE m.role <> 'system' AND (m.status = 'complete' OR m.content <> ''
                                                              OR coalesce(m.extra ? 'tool_calls', false)))::integer
                   AS nmessages,
               coalesce((array_agg(m.role ORDER BY m.seq) FILTER (WHERE m.role <> 'system'))[1] = 'tool',
                        false) AS continues
          FROM split_turns st JOIN messages m ON m.turn_id = st.new_id
         WHERE st.split
         GROUP BY st.new_id) s
 WHERE t.id = s.new_id;

-- The walk of begin_turn plans on the statistics of turns, which this may have grown a lot.
ANALYZE turns;

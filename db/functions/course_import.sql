-- Import the course rows of p_table not imported before, in the caller's transaction
-- (db/course_import.py runs it under the migrations' advisory lock).  Returns the counts as
-- jsonb (also kept in course_imports); every course row seen is recorded in course_rows,
-- so no run imports a row twice.
--
-- Order: the course's own, `ORDER BY time`, and for rows whose times tie, physical order
-- (ctid).  The course's timestamps tie whenever one request inserted several rows (now()
-- is the transaction's start), and its ids are random uuids that say nothing about order.
-- The table is append-only, so physical order is insertion order (bar space reused after
-- a DELETE and VACUUM); it is also the order the course's own ORDER BY time returned
-- ties in when it read through an index on time (btree ties are kept in heap order).
--
-- Rows with a NULL appID are board posts (chatts, same id and time).  Rows with an appID
-- are that appID's conversation, under owner p_owner_id (db/course_import.py: the anonymous
-- namespace, where the course's clients, which send no credentials, find them), appended
-- after any turns it already has, as ended ('complete') turns split the way chatterd
-- stores them: a new turn at each user message that follows a message of another role (the
-- user messages of one request stay together), so an assistant's tool calls stay in the
-- turn with their results, and the context budget, which sends whole turns only, can send
-- the newest turns of a long history.  Skipped, counted by reason: rows without an id or
-- repeating an earlier row's id; an empty or over-long appID; a role that is not one of
-- Ollama's (system, user, assistant, tool), e.g. a model or user name on an appID row.
-- toolcalls (JSON text) becomes the message's tool_calls; the last toolschemas of an
-- appID becomes its tool_schemas row.  The course table is only read.
DROP FUNCTION IF EXISTS course_import(regclass);
CREATE OR REPLACE FUNCTION course_import(p_table regclass, p_owner_id bigint) RETURNS jsonb
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_layout jsonb := course_layout(p_table);
    v_import integer;
    v_board integer;
    v_messages integer;
    v_appids integer;
    v_schemas integer;
    v_skipped jsonb;
    v_dropped integer;
    v_turns integer;
BEGIN
    IF v_layout IS NULL THEN
        RAISE EXCEPTION '% is not the course''s chatts table', p_table;
    END IF;
    INSERT INTO course_imports (source) VALUES (p_table::text) RETURNING id INTO v_import;

    DROP TABLE IF EXISTS pg_temp.course_batch;
    CREATE TEMP TABLE course_batch (
        ord bigint, id uuid, nth bigint, role text, message text, time timestamptz,
        appid text, toolcalls text, toolschemas text, tool_calls jsonb, reason text,
        part bigint  -- the row's turn among its appID's in this run: 1, 2, ...
    ) ON COMMIT DROP;
    EXECUTE format(
        'INSERT INTO pg_temp.course_batch (ord, id, nth, role, message, time, appid, toolcalls, toolschemas)'
        ' SELECT row_number() OVER (ORDER BY c.time, c.ctid),'
        '        c.id, row_number() OVER (PARTITION BY c.id ORDER BY c.time, c.ctid),'
        '        c.%I::text, c.message::text, c.time::timestamptz, %s, %s, %s'
        '   FROM %s c'
        '  WHERE c.id IS NULL OR NOT EXISTS (SELECT 1 FROM course_rows r WHERE r.course_id = c.id)',
        v_layout->>'role',
        CASE WHEN v_layout->>'appid' IS NULL THEN 'NULL::text' ELSE format('c.%I::text', v_layout->>'appid') END,
        CASE WHEN v_layout->>'toolcalls' IS NULL THEN 'NULL::text' ELSE format('c.%I::text', v_layout->>'toolcalls') END,
        CASE WHEN v_layout->>'toolschemas' IS NULL THEN 'NULL::text' ELSE format('c.%I::text', v_layout->>'toolschemas') END,
        p_table);

    UPDATE pg_temp.course_batch SET reason = CASE
        WHEN id IS NULL THEN 'no id'
        WHEN nth > 1 THEN 'repeated id'
        WHEN appid IS NULL THEN NULL
        WHEN appid = '' THEN 'empty appID'
        WHEN length(appid) > 155 THEN 'appID longer than 155 characters'
        WHEN role IS NULL THEN 'no role'
        WHEN role NOT IN ('system', 'user', 'assistant', 'tool') THEN format('role %L', role)
    END;
    UPDATE pg_temp.course_batch SET tool_calls = course_json(toolcalls)
     WHERE reason IS NULL AND appid IS NOT NULL AND nullif(btrim(toolcalls), '') IS NOT NULL;

    -- Messages before an appID's first user message are in its first turn, with it.
    UPDATE pg_temp.course_batch b SET part = s.part
      FROM (SELECT ord, greatest(sum(starts) OVER (PARTITION BY appid ORDER BY ord), 1) AS part
              FROM (SELECT ord, appid,
                           (role = 'user' AND lag(role) OVER (PARTITION BY appid ORDER BY ord)
                                              IS DISTINCT FROM 'user')::integer AS starts
                      FROM pg_temp.course_batch WHERE reason IS NULL AND appid IS NOT NULL) r) s
     WHERE b.ord = s.ord;

    INSERT INTO chatts (id, name, message, time)
    SELECT id, coalesce(role, ''), coalesce(message, ''), coalesce(time, now())
      FROM pg_temp.course_batch WHERE reason IS NULL AND appid IS NULL ORDER BY ord;
    GET DIAGNOSTICS v_board = ROW_COUNT;

    -- Turn ids are the conversation's order: inserted in the rows' order, an appID's n-th
    -- turn id is its part n.
    DROP TABLE IF EXISTS pg_temp.course_turns;
    CREATE TEMP TABLE course_turns (id bigint, appid text, part bigint) ON COMMIT DROP;
    WITH t AS (
        INSERT INTO turns (owner_id, appid, status, owner, started_at, ended_at)
        SELECT p_owner_id, appid, 'complete', 'course import ' || v_import, min(coalesce(time, now())), now()
          FROM pg_temp.course_batch WHERE reason IS NULL AND appid IS NOT NULL
         GROUP BY appid, part ORDER BY min(ord)
        RETURNING id, appid)
    INSERT INTO pg_temp.course_turns (id, appid, part)
    SELECT id, appid, row_number() OVER (PARTITION BY appid ORDER BY id) FROM t;
    GET DIAGNOSTICS v_turns = ROW_COUNT;
    INSERT INTO messages (owner_id, appid, turn_id, role, content, extra, created_at, ntokens)
    SELECT p_owner_id, b.appid, t.id, b.role, coalesce(b.message, ''), e.extra,
           coalesce(b.time, now()), estimate_tokens(coalesce(b.message, ''), e.extra)
      FROM pg_temp.course_batch b JOIN pg_temp.course_turns t ON t.appid = b.appid AND t.part = b.part
     CROSS JOIN LATERAL (SELECT CASE WHEN jsonb_typeof(b.tool_calls) = 'array'
                                          AND jsonb_array_length(b.tool_calls) > 0
                                     THEN jsonb_build_object('tool_calls', b.tool_calls) END) e(extra)
     WHERE b.reason IS NULL ORDER BY b.ord;
    GET DIAGNOSTICS v_messages = ROW_COUNT;
    -- Each turn's size, as end_turn keeps it (begin_turn's walk reads it), and whether it
    -- starts with a tool result (a client's, for a call of the turn before).  The
    -- conversation's size grows by what it sent (begin_turn would otherwise count a whole
    -- imported conversation at its first turn); one whose earlier turns were never counted
    -- is left to that count.
    UPDATE turns t SET tokens = s.tokens, nmessages = s.nmessages,
                       continues = coalesce((SELECT m.role = 'tool' FROM messages m
                                              WHERE m.owner_id = p_owner_id AND m.turn_id = t.id
                                                AND m.role <> 'system'
                                              ORDER BY m.seq LIMIT 1), false)
      FROM pg_temp.course_turns c CROSS JOIN LATERAL turn_size(p_owner_id, c.id) s
     WHERE t.owner_id = p_owner_id AND t.id = c.id;
    INSERT INTO conversation_sizes AS cs (owner_id, appid, messages, tokens)
    SELECT p_owner_id, m.appid, count(*), sum(m.ntokens)
      FROM pg_temp.course_turns c JOIN messages m ON m.owner_id = p_owner_id AND m.turn_id = c.id
     WHERE is_sent(m.status, m.content, m.extra)
     GROUP BY m.appid
    HAVING EXISTS (SELECT 1 FROM conversation_sizes s
                    WHERE s.owner_id = p_owner_id AND s.appid = m.appid)
        OR NOT EXISTS (SELECT 1 FROM turns t
                        WHERE t.owner_id = p_owner_id AND t.appid = m.appid AND t.id < min(c.id))
    ON CONFLICT (owner_id, appid) DO UPDATE
        SET messages = cs.messages + EXCLUDED.messages, tokens = cs.tokens + EXCLUDED.tokens;
    SELECT count(DISTINCT appid) INTO v_appids
      FROM pg_temp.course_batch WHERE reason IS NULL AND appid IS NOT NULL;

    INSERT INTO tool_schemas AS s (owner_id, appid, schemas)
    SELECT DISTINCT ON (appid) p_owner_id, appid, course_json(toolschemas)
      FROM pg_temp.course_batch
     WHERE reason IS NULL AND appid IS NOT NULL AND course_json(toolschemas) IS NOT NULL
     ORDER BY appid, ord DESC
    ON CONFLICT (owner_id, appid) DO UPDATE SET schemas = EXCLUDED.schemas, updated_at = now();
    GET DIAGNOSTICS v_schemas = ROW_COUNT;

    INSERT INTO course_rows (course_id, import_id, outcome)
    SELECT id, v_import, CASE WHEN reason IS NOT NULL THEN 'skipped'
                              WHEN appid IS NULL THEN 'board' ELSE 'message' END
      FROM pg_temp.course_batch WHERE id IS NOT NULL AND nth = 1;

    SELECT coalesce(jsonb_object_agg(reason, n), '{}') INTO v_skipped
      FROM (SELECT reason, count(*) AS n FROM pg_temp.course_batch
             WHERE reason IS NOT NULL GROUP BY reason) r;
    -- toolcalls that are not a JSON array: the message is kept, without them.
    SELECT count(*) INTO v_dropped FROM pg_temp.course_batch
     WHERE reason IS NULL AND appid IS NOT NULL AND nullif(btrim(toolcalls), '') IS NOT NULL
       AND coalesce(jsonb_typeof(tool_calls), 'invalid') NOT IN ('array', 'null');

    UPDATE course_imports SET board = v_board, messages = v_messages, appids = v_appids,
                              tool_schemas = v_schemas, skipped = v_skipped
     WHERE id = v_import;
    DROP TABLE pg_temp.course_batch;
    DROP TABLE pg_temp.course_turns;
    RETURN jsonb_build_object('import', v_import, 'source', p_table::text, 'board', v_board,
                              'messages', v_messages, 'appids', v_appids, 'turns', v_turns,
                              'tool_schemas', v_schemas, 'skipped', v_skipped,
                              'toolcalls_dropped', v_dropped);
END
$$;

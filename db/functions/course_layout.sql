-- The layout of a course chatts table, or NULL when p_table is not one: which column holds
-- the role (`name`, or `username` in the course's older spelling) and which optional ones
-- exist (appID, added by llmChat; toolcalls and toolschemas, added by llmTools).  A chatts
-- with chatterd's own `seq` column is not the course's.
-- Called by db/course_import.py before it imports.
CREATE OR REPLACE FUNCTION course_layout(p_table regclass) RETURNS jsonb
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    WITH cols AS (
        SELECT attname::text AS name, atttypid AS type FROM pg_attribute
         WHERE attrelid = p_table AND attnum > 0 AND NOT attisdropped)
    SELECT jsonb_build_object(
               'role', (SELECT name FROM cols WHERE name IN ('name', 'username')
                         ORDER BY name = 'name' DESC LIMIT 1),
               'appid', (SELECT name FROM cols WHERE lower(name) = 'appid' LIMIT 1),
               'toolcalls', (SELECT name FROM cols WHERE lower(name) = 'toolcalls' LIMIT 1),
               'toolschemas', (SELECT name FROM cols WHERE lower(name) = 'toolschemas' LIMIT 1))
     WHERE EXISTS (SELECT 1 FROM cols WHERE name = 'message')
       AND EXISTS (SELECT 1 FROM cols WHERE name = 'id' AND type = 'uuid'::regtype)
       AND EXISTS (SELECT 1 FROM cols WHERE name = 'time')
       AND EXISTS (SELECT 1 FROM cols WHERE name IN ('name', 'username'))
       AND NOT EXISTS (SELECT 1 FROM cols WHERE name = 'seq')
$$;

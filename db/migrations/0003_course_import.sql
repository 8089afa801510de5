-- Tool schemas an app gave for its conversation (Ollama's `tools`), one set per appID.
-- Filled by the course import (its `toolschemas` column) and kept for /llmtools.
CREATE TABLE tool_schemas (
    appid      text PRIMARY KEY CHECK (length(appid) BETWEEN 1 AND 155),
    schemas    jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Imports of the course's chatts table (db/course_import.py, db/functions/course_import.sql):
-- one row per run, with counts.
CREATE TABLE course_imports (
    id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source       text NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT now(),
    board        integer NOT NULL DEFAULT 0,   -- board posts (NULL appID)
    messages     integer NOT NULL DEFAULT 0,   -- conversation messages
    appids       integer NOT NULL DEFAULT 0,   -- appIDs that got a turn
    tool_schemas integer NOT NULL DEFAULT 0,   -- appIDs whose tool schemas were stored
    skipped      jsonb NOT NULL DEFAULT '{}'   -- reason -> rows
);

-- Every course row seen, by its id, so no run imports a row twice (even after llmprep
-- deleted what it became).  Rows without an id cannot be tracked and are skipped.
CREATE TABLE course_rows (
    course_id uuid PRIMARY KEY,
    import_id integer NOT NULL REFERENCES course_imports (id),
    outcome   text NOT NULL CHECK (outcome IN ('board', 'message', 'skipped'))
);

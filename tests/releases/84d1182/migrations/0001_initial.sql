-- The public board (/postchatt, /getchatts).  LLM conversations never live here.
CREATE TABLE chatts (
    seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- order of posting; never ties
    id      uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    name    text NOT NULL,
    message text NOT NULL,
    time    timestamptz NOT NULL DEFAULT now()
);

-- One row per message of an appID's conversation with the LLM, stored verbatim.
CREATE TABLE messages (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- conversation order
    appid      text NOT NULL CHECK (length(appid) BETWEEN 1 AND 155),
    role       text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content    text NOT NULL,
    extra      jsonb,             -- other Ollama message fields (images, tool_calls, ...)
    status     text NOT NULL DEFAULT 'complete'
               CHECK (status IN ('complete', 'interrupted', 'failed')),
    error      text,              -- why a reply is not complete
    model      text,
    tokens     integer,           -- Ollama's eval_count for a reply
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_appid_seq ON messages (appid, seq);

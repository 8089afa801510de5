"""Everything that touches PostgreSQL: the pool, the schema and every SQL statement.

Modules: `pool` (connect, DatabaseUnavailable), `migrate` (the schema: versioned
migrations in `migrations/`, one file per SQL function in `functions/`), `embedded` (a
private PostgreSQL when no DSN is given), `chatts` (the public board), `conversations`
(LLM history, per owner and appID: the turns), `conversation_records` (an owner's
conversations as a whole: list, read back, title, delete), `history_cache` and
`course_import` (adopting a course server's `public.chatts`).
chatterd's tables and functions live in the schema `chatterd`.
"""

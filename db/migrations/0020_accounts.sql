-- People: accounts, their login sessions and API tokens, and the login throttle
-- (handlers/auth.py; the SQL that uses these tables is in db/accounts.py).
-- Secrets are never stored: a password as its Argon2id PHC string, a session id and an
-- API token as the SHA-256 digest of the random string handed out (accounts/credentials.py).

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      text NOT NULL CHECK (length(username) BETWEEN 1 AND 64),  -- as chosen (NFC)
    -- What names are compared by (accounts/rules.py: NFC of the case-folded name), so
    -- "Ada" and "ada" are one account.
    username_key  text NOT NULL UNIQUE CHECK (length(username_key) BETWEEN 1 AND 256),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id_hash      bytea PRIMARY KEY CHECK (length(id_hash) = 32),
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),  -- idle expiry counts from here
    expires_at   timestamptz NOT NULL                 -- absolute expiry, fixed at login
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE api_tokens (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    token_hash   bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at   timestamptz,  -- NULL: until revoked
    revoked_at   timestamptz   -- set by DELETE /auth/tokens/{id}; the row stays for the record
);
CREATE INDEX api_tokens_user ON api_tokens (user_id, id);

-- Login attempts per (username, client address) in the current window: one row per pair
-- that failed lately, deleted at a successful login.  In PostgreSQL so that every chatterd
-- process behind one nginx counts the same attempts.
CREATE TABLE login_throttle (
    username_key text NOT NULL,
    address      text NOT NULL,
    attempts     integer NOT NULL,
    window_start timestamptz NOT NULL,
    PRIMARY KEY (username_key, address)
);
CREATE INDEX login_throttle_window ON login_throttle (window_start);

-- Who posted a chatt on the public board (NULL: anonymous, or an account since deleted).
ALTER TABLE chatts ADD COLUMN user_id bigint REFERENCES users (id) ON DELETE SET NULL;
CREATE INDEX chatts_user ON chatts (user_id) WHERE user_id IS NOT NULL;

-- Same tables and columns as the Postgres migrations with the same numbers. SQLite stores
-- timestamps as INTEGER unix milliseconds, UUIDs as TEXT (hyphenated) and JSON as TEXT.

CREATE TABLE users (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    status TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    verification_token TEXT,
    verification_code TEXT,
    verification_token_expires_at INTEGER,
    verification_attempts INTEGER NOT NULL DEFAULT 0,
    verified_at INTEGER,
    password_reset_token TEXT,
    password_reset_token_expires_at INTEGER,
    password_reset_attempts INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_login_at INTEGER
);

CREATE UNIQUE INDEX users_email_idx ON users (email);
CREATE INDEX users_status_idx ON users (status);

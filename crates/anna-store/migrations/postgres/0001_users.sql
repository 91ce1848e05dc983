-- Each migration also upgrades, in place, a database created by the TypeScript predecessor:
-- its tables already exist and are untracked by sqlx. So every statement must be a no-op
-- where the object already exists. The CREATE TABLE lists only the predecessor's columns and
-- the columns added since come through ALTER TABLE, so a fresh database and an upgraded one
-- end up with the same shape by the same path.

CREATE TABLE IF NOT EXISTS users (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    status text NOT NULL,
    password_hash text NOT NULL,
    verification_token text,
    verification_code text,
    verification_token_expires_at timestamptz,
    verified_at timestamptz,
    password_reset_token text,
    password_reset_token_expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz
);

-- The predecessor kept these secrets in clear (a six-digit code, UUIDs); they now hold keyed
-- hashes, which fit only in text whatever type the old column had. A no-op on text.
ALTER TABLE users
    ALTER COLUMN verification_token TYPE text,
    ALTER COLUMN verification_code TYPE text,
    ALTER COLUMN password_reset_token TYPE text;

-- Wrong-attempt counters are new: existing rows start with a clean slate.
ALTER TABLE users ADD COLUMN IF NOT EXISTS verification_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS password_reset_attempts integer NOT NULL DEFAULT 0;

CREATE UNIQUE INDEX IF NOT EXISTS users_email_idx ON users (email);
CREATE INDEX IF NOT EXISTS users_status_idx ON users (status);

-- See the Postgres migration of the same number.

CREATE TABLE session_chat_aliases (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_key TEXT NOT NULL,
    alias TEXT NOT NULL,
    alias_type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX session_chat_aliases_alias_idx ON session_chat_aliases (session_id, alias);
CREATE INDEX session_chat_aliases_key_idx ON session_chat_aliases (session_id, chat_key);

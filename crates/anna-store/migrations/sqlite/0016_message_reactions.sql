-- See the Postgres migration of the same number.

CREATE TABLE session_message_reactions (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid TEXT NOT NULL,
    message_id TEXT NOT NULL,
    actor_jid TEXT NOT NULL,
    from_me INTEGER NOT NULL DEFAULT 0,
    emoji TEXT,
    reacted_at INTEGER,
    is_removed INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX session_message_reactions_actor_idx ON session_message_reactions (session_id, message_id, actor_jid);
CREATE INDEX session_message_reactions_tenant_id_idx ON session_message_reactions (tenant_id);

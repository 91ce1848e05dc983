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

CREATE TABLE session_contacts (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    contact_jid TEXT NOT NULL,
    contact_lid TEXT,
    phone_number TEXT,
    name TEXT,
    notify TEXT,
    verified_name TEXT,
    img_url TEXT,
    status TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX session_contacts_contact_idx ON session_contacts (session_id, contact_jid);
CREATE INDEX session_contacts_tenant_id_idx ON session_contacts (tenant_id);

CREATE TABLE session_message_pending (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT,
    at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    chat_jid TEXT,
    actor_jid TEXT,
    from_me INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, message_id, kind)
);
CREATE INDEX session_message_pending_created_idx ON session_message_pending (created_at);

CREATE INDEX session_messages_session_time_idx ON session_messages (session_id, timestamp);
CREATE TABLE tenant_settings (
    tenant_id TEXT NOT NULL PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    message_retention_days INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

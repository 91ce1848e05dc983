-- See the Postgres migration of the same number. The rows belong to their session: deleted
-- with it (foreign keys are on in every connection), never written for a session being deleted.

CREATE TABLE session_messages (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid TEXT NOT NULL,
    message_id TEXT NOT NULL,
    from_me INTEGER NOT NULL,
    sender_jid TEXT,
    timestamp INTEGER NOT NULL,
    type TEXT,
    text TEXT,
    raw TEXT,
    status TEXT,
    status_at INTEGER,
    is_edited INTEGER NOT NULL DEFAULT 0,
    edited_at INTEGER,
    is_deleted INTEGER NOT NULL DEFAULT 0,
    deleted_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX session_messages_message_idx ON session_messages (session_id, message_id);
CREATE INDEX session_messages_tenant_id_idx ON session_messages (tenant_id);
CREATE INDEX session_messages_chat_idx ON session_messages (session_id, chat_jid, timestamp DESC, message_id DESC);

CREATE TABLE session_chats (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid TEXT NOT NULL,
    chat_name TEXT,
    last_message_id TEXT,
    last_message_ts INTEGER,
    last_message_text TEXT,
    last_message_type TEXT,
    unread_count INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX session_chats_chat_idx ON session_chats (session_id, chat_jid);
CREATE INDEX session_chats_tenant_id_idx ON session_chats (tenant_id);

-- Message history, by the predecessor's table and column names: every message a session sent
-- or received, and per chat its last message and unread count. Written by the message-history
-- subscriber of the domain events (each event applied once).

CREATE TABLE session_messages (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL,
    chat_jid text NOT NULL,
    message_id text NOT NULL,
    from_me boolean NOT NULL,
    sender_jid text,
    timestamp timestamptz,
    type text,
    text text,
    raw jsonb,
    status text,
    status_at timestamptz,
    is_edited boolean NOT NULL DEFAULT false,
    edited_at timestamptz,
    is_deleted boolean NOT NULL DEFAULT false,
    deleted_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX session_messages_message_idx ON session_messages (session_id, message_id);
CREATE INDEX session_messages_tenant_id_idx ON session_messages (tenant_id);
-- A chat's history, newest first, paged by (timestamp, message_id).
CREATE INDEX session_messages_chat_idx ON session_messages (session_id, chat_jid, timestamp DESC, message_id DESC);

CREATE TABLE session_chats (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL,
    chat_jid text NOT NULL,
    chat_name text,
    last_message_id text,
    last_message_ts timestamptz,
    last_message_text text,
    last_message_type text,
    unread_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX session_chats_chat_idx ON session_chats (session_id, chat_jid);
CREATE INDEX session_chats_tenant_id_idx ON session_chats (tenant_id);

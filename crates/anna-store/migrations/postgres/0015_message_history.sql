-- Message history, by the predecessor's table and column names: every message a session sent
-- or received, and per chat its last message and unread count. Written by the message-history
-- subscriber of the domain events (each event applied once).
--
-- A database of the predecessor may hold these tables already (its later versions had them,
-- some columns added by later migrations): see 0001. On a fresh database the rows belong to
-- their session (deleted with it, and never written for a session being deleted).

CREATE TABLE IF NOT EXISTS session_messages (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid text NOT NULL,
    message_id text NOT NULL,
    from_me boolean NOT NULL,
    sender_jid text,
    timestamp timestamptz,
    type text,
    text text,
    raw jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS status text;
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS status_at timestamptz;
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS is_edited boolean NOT NULL DEFAULT false;
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS edited_at timestamptz;
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS is_deleted boolean NOT NULL DEFAULT false;
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS deleted_at timestamptz;
CREATE UNIQUE INDEX IF NOT EXISTS session_messages_message_idx ON session_messages (session_id, message_id);
CREATE INDEX IF NOT EXISTS session_messages_tenant_id_idx ON session_messages (tenant_id);
-- A chat's history, newest first, paged by (timestamp, message_id).
CREATE INDEX IF NOT EXISTS session_messages_chat_idx
    ON session_messages (session_id, chat_jid, timestamp DESC NULLS LAST, message_id DESC);

CREATE TABLE IF NOT EXISTS session_chats (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid text NOT NULL,
    chat_name text,
    last_message_id text,
    last_message_ts timestamptz,
    last_message_text text,
    last_message_type text,
    unread_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS session_chats_chat_idx ON session_chats (session_id, chat_jid);
CREATE INDEX IF NOT EXISTS session_chats_tenant_id_idx ON session_chats (tenant_id);

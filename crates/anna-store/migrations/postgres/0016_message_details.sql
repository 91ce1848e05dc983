-- Reactions to stored messages, by the predecessor's table name: one row per (message, actor),
-- the latest reaction of that actor (a removed one is kept, flagged, so an older reaction
-- arriving late cannot bring it back). A predecessor's database may hold the table already.

CREATE TABLE IF NOT EXISTS session_message_reactions (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid text NOT NULL,
    message_id text NOT NULL,
    actor_jid text NOT NULL,
    from_me boolean NOT NULL DEFAULT false,
    emoji text,
    reacted_at timestamptz,
    is_removed boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS session_message_reactions_actor_idx
    ON session_message_reactions (session_id, message_id, actor_jid);
CREATE INDEX IF NOT EXISTS session_message_reactions_tenant_id_idx ON session_message_reactions (tenant_id);

-- A session's contacts as its phone knows them (history sync, push names), by the
-- predecessor's table name.
CREATE TABLE IF NOT EXISTS session_contacts (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    contact_jid text NOT NULL,
    contact_lid text,
    phone_number text,
    name text,
    notify text,
    verified_name text,
    img_url text,
    status text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS session_contacts_contact_idx ON session_contacts (session_id, contact_jid);
CREATE INDEX IF NOT EXISTS session_contacts_tenant_id_idx ON session_contacts (tenant_id);

-- Changes (edits, deletions, statuses) of messages not stored yet: events are applied by
-- several readers at once, so a change can overtake its message. Applied, then removed, when
-- the message is stored.
CREATE TABLE IF NOT EXISTS session_message_pending (
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    message_id text NOT NULL,
    kind text NOT NULL,
    value text,
    at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    chat_jid text,
    actor_jid text,
    from_me boolean NOT NULL DEFAULT false,
    PRIMARY KEY (session_id, message_id, kind)
);
CREATE INDEX IF NOT EXISTS session_message_pending_created_idx ON session_message_pending (created_at);

-- Retention: a session's messages are purged once older than their tenant's retention (this
-- table; none: the operator's MESSAGES_RETENTION_DAYS), oldest first, by session.
CREATE INDEX IF NOT EXISTS session_messages_session_time_idx ON session_messages (session_id, timestamp);
CREATE TABLE IF NOT EXISTS tenant_settings (
    tenant_id uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    message_retention_days integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

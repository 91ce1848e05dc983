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

-- The addresses of a chat, by the predecessor's table name: a contact's phone JID and its LID
-- (WhatsApp addresses one-to-one chats by either). Aliases with the same chat_key are one
-- chat. anna's keys are the chat's preferred address (its phone or group JID), so units of
-- work that link the same pair at once agree on the key.
CREATE TABLE IF NOT EXISTS session_chat_aliases (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_key text NOT NULL,
    alias text NOT NULL,
    alias_type text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS session_chat_aliases_alias_idx ON session_chat_aliases (session_id, alias);
CREATE INDEX IF NOT EXISTS session_chat_aliases_key_idx ON session_chat_aliases (session_id, chat_key);

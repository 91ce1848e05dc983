-- Media objects anna keeps in its media store (a directory or a bucket): files tenants upload
-- through POST /media to send, and the media of messages their sessions receive. The object
-- itself is in the store under object_key; no foreign key to sessions, because deleting a
-- session must also delete its objects from the store: the media upkeep deletes the objects
-- of sessions that are gone, then their rows.
CREATE TABLE media_objects (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL,
    object_key text NOT NULL,
    kind text NOT NULL,
    mime text NOT NULL,
    size bigint NOT NULL,
    file_name text NOT NULL,
    -- base64 of the SHA-256 of the content
    sha256 text NOT NULL,
    -- 'upload' (POST /media) or 'message' (a received message's media)
    source text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX media_objects_object_key_idx ON media_objects (object_key);
CREATE INDEX media_objects_tenant_id_idx ON media_objects (tenant_id);
CREATE INDEX media_objects_session_time_idx ON media_objects (session_id, created_at);

-- The media of a message, by the predecessor's table name. A predecessor's database may hold
-- it already (its url was a public bucket URL); anna's rows name their object by media_id, and
-- their url is the API route that hands out a signed download URL (/media/<media_id>).
CREATE TABLE IF NOT EXISTS session_message_media (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid text NOT NULL,
    message_id text NOT NULL,
    kind text NOT NULL,
    mime text,
    size bigint,
    file_name text,
    url text NOT NULL,
    sha256 text,
    width integer,
    height integer,
    duration integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE session_message_media ADD COLUMN IF NOT EXISTS media_id uuid;
CREATE UNIQUE INDEX IF NOT EXISTS session_message_media_message_idx
    ON session_message_media (session_id, message_id, kind);
CREATE INDEX IF NOT EXISTS session_message_media_tenant_id_idx ON session_message_media (tenant_id);
CREATE INDEX IF NOT EXISTS session_message_media_media_id_idx ON session_message_media (media_id);

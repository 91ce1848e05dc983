-- See the Postgres migration of the same number.

CREATE TABLE media_objects (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    object_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,
    file_name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX media_objects_object_key_idx ON media_objects (object_key);
CREATE INDEX media_objects_tenant_id_idx ON media_objects (tenant_id);
CREATE INDEX media_objects_session_time_idx ON media_objects (session_id, created_at);

CREATE TABLE session_message_media (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    chat_jid TEXT NOT NULL,
    message_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    mime TEXT,
    size INTEGER,
    file_name TEXT,
    url TEXT NOT NULL,
    sha256 TEXT,
    width INTEGER,
    height INTEGER,
    duration INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    media_id TEXT
);
CREATE UNIQUE INDEX session_message_media_message_idx ON session_message_media (session_id, message_id, kind);
CREATE INDEX session_message_media_tenant_id_idx ON session_message_media (tenant_id);
CREATE INDEX session_message_media_media_id_idx ON session_message_media (media_id);

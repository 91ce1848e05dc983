-- Timestamp defaults are unix milliseconds, like every timestamp written by the store.

CREATE TABLE session_auth_creds (
    session_id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT,
    creds TEXT,
    created_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

CREATE INDEX session_auth_creds_tenant_id_idx ON session_auth_creds (tenant_id);

CREATE TABLE session_auth_keys (
    session_id TEXT NOT NULL,
    tenant_id TEXT,
    key_type TEXT NOT NULL,
    key_id TEXT NOT NULL,
    value TEXT,
    created_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    PRIMARY KEY (session_id, key_type, key_id)
);

CREATE INDEX session_auth_keys_session_id_idx ON session_auth_keys (session_id);
CREATE INDEX session_auth_keys_tenant_id_idx ON session_auth_keys (tenant_id);

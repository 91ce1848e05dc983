-- No seq column here, unlike Postgres: the implicit rowid already is an insertion counter
-- (a new row gets max(rowid) + 1), and writers are serialised by BEGIN IMMEDIATE, so rowid
-- order is commit order. Reading an aggregate's events oldest first orders by rowid alone;
-- created_at comes from the application clock, which can step backwards.

CREATE TABLE outbox_events (
    id TEXT NOT NULL PRIMARY KEY,
    event_id TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    event_name TEXT NOT NULL,
    occurred_on INTEGER NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    published_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    tenant_id TEXT,
    traceparent TEXT
);

CREATE INDEX outbox_events_status_occurred_on_idx ON outbox_events (status, occurred_on);
CREATE INDEX outbox_events_aggregate_id_idx ON outbox_events (aggregate_id);

CREATE TABLE dead_letters (
    id TEXT NOT NULL PRIMARY KEY,
    event_id TEXT,
    aggregate_id TEXT,
    event_name TEXT,
    occurred_on INTEGER,
    payload TEXT,
    error TEXT,
    attempts INTEGER,
    created_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
);

CREATE INDEX dead_letters_event_id_idx ON dead_letters (event_id);

-- Same tables and columns as migrations/postgres/0007_event_log.sql.

-- SQLite cannot add a column whose default is an expression, so "default now" becomes 0
-- (available at once), which is what every writer without an opinion means; the store always
-- writes the column itself. Existing rows were ready when they were written.
ALTER TABLE outbox_events ADD COLUMN available_at INTEGER NOT NULL DEFAULT 0;
UPDATE outbox_events SET available_at = created_at;

-- The lease of a claimed row: past it, the relay that claimed the row is presumed dead.
ALTER TABLE outbox_events ADD COLUMN locked_until INTEGER;

-- The same three indexes as on Postgres, over rows still to publish only. SQLite cannot index
-- the rowid itself (every index ends with it implicitly), so the claim reads its candidates
-- through the first one and sorts them by rowid; the other two find the rows that hold back a
-- candidate: an earlier row of its aggregate waiting for a retry or under a live lease.
CREATE INDEX outbox_events_claim_idx ON outbox_events (status)
    WHERE status IN ('pending', 'processing');
CREATE INDEX outbox_events_pending_aggregate_idx ON outbox_events (aggregate_id, available_at)
    WHERE status = 'pending';
CREATE INDEX outbox_events_processing_aggregate_idx ON outbox_events (aggregate_id, locked_until)
    WHERE status = 'processing';

-- WITHOUT ROWID: the composite primary key is the table, with no second copy in an index.
CREATE TABLE applied_events (
    subscriber TEXT NOT NULL,
    event_id TEXT NOT NULL,
    applied_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    PRIMARY KEY (subscriber, event_id)
) WITHOUT ROWID;

CREATE INDEX applied_events_applied_at_idx ON applied_events (applied_at);

CREATE TABLE event_attempts (
    subscriber TEXT NOT NULL,
    event_id TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    PRIMARY KEY (subscriber, event_id)
) WITHOUT ROWID;

ALTER TABLE dead_letters ADD COLUMN tenant_id TEXT;
ALTER TABLE dead_letters ADD COLUMN traceparent TEXT;

-- The event backbone: outbox leases and retries, per-subscriber bookkeeping, dead letters with
-- their tenant and trace. See 0001 for why everything is IF NOT EXISTS.

-- A retry waits until available_at. Existing rows were ready when they were written. The
-- column is added nullable and backfilled before NOT NULL, so existing rows get created_at
-- rather than the time of the migration.
ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS available_at timestamptz;
UPDATE outbox_events SET available_at = created_at WHERE available_at IS NULL;
ALTER TABLE outbox_events
    ALTER COLUMN available_at SET DEFAULT now(),
    ALTER COLUMN available_at SET NOT NULL;

-- The lease of a claimed row: past it, the relay that claimed the row is presumed dead. A
-- processing row without one (left behind by the predecessor) counts as expired.
ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS locked_until timestamptz;

-- These indexes hold only rows still to publish (a few thousand at most), never the published
-- rows that wait for the purge. The first gives the claim its candidates oldest first. The
-- other two find what may hold back a candidate: an earlier row of its aggregate that waits for
-- a retry, or one under a live lease. Each probe is an index range over the rows that really
-- block (available_at > now, locked_until >= now), so its cost does not grow with the number of
-- ready rows of a busy aggregate, as it would with (aggregate_id, seq).
CREATE INDEX IF NOT EXISTS outbox_events_claim_idx ON outbox_events (seq)
    WHERE status IN ('pending', 'processing');
CREATE INDEX IF NOT EXISTS outbox_events_pending_aggregate_idx ON outbox_events (aggregate_id, available_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_events_processing_aggregate_idx ON outbox_events (aggregate_id, locked_until)
    WHERE status = 'processing';

-- Which events each subscriber has applied, written in the same transaction as its effects.
CREATE TABLE IF NOT EXISTS applied_events (
    subscriber text NOT NULL,
    event_id uuid NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscriber, event_id)
);

CREATE INDEX IF NOT EXISTS applied_events_applied_at_idx ON applied_events (applied_at);

-- Failed attempts per subscriber and event; only events that failed at least once have a row.
CREATE TABLE IF NOT EXISTS event_attempts (
    subscriber text NOT NULL,
    event_id uuid NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscriber, event_id)
);

ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS tenant_id text;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS traceparent text;

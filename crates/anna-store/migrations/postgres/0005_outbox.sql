-- The predecessor created these two tables outside its tracked migrations (database/outbox.sql);
-- see 0001 for why everything is IF NOT EXISTS.

CREATE TABLE IF NOT EXISTS outbox_events (
    id uuid PRIMARY KEY,
    event_id text NOT NULL,
    aggregate_id text NOT NULL,
    event_name text NOT NULL,
    occurred_on timestamptz NOT NULL,
    payload jsonb NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    published_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS tenant_id text;
ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS traceparent text;

-- Reading an aggregate's events oldest first orders by created_at, then by seq: the events of
-- one append share nearly the same created_at, and only an insertion counter keeps them in
-- the order they were appended. Existing rows are numbered in their physical order.
ALTER TABLE outbox_events ADD COLUMN IF NOT EXISTS seq bigint GENERATED ALWAYS AS IDENTITY;

CREATE INDEX IF NOT EXISTS outbox_events_status_occurred_on_idx ON outbox_events (status, occurred_on);
-- Not in the predecessor: serves the per-aggregate read without scanning the whole outbox.
CREATE INDEX IF NOT EXISTS outbox_events_aggregate_id_idx ON outbox_events (aggregate_id, created_at, seq);

CREATE TABLE IF NOT EXISTS dead_letters (
    id uuid PRIMARY KEY,
    event_id text,
    aggregate_id text,
    event_name text,
    occurred_on timestamptz,
    payload jsonb,
    error text,
    attempts integer,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS dead_letters_event_id_idx ON dead_letters (event_id);

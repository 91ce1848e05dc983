-- The event statistics projection: applied events per name, written by a subscriber in the
-- same transaction as its applied-event record, so each event counts exactly once.
CREATE TABLE IF NOT EXISTS event_stats (
    event_name text PRIMARY KEY,
    count bigint NOT NULL,
    last_occurred_on timestamptz NOT NULL
);

-- The event statistics projection: applied events per name, written by a subscriber in the
-- same transaction as its applied-event record, so each event counts exactly once.
CREATE TABLE event_stats (
    event_name TEXT NOT NULL PRIMARY KEY,
    count INTEGER NOT NULL,
    last_occurred_on INTEGER NOT NULL
);

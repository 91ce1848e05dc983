-- Rows published recently, for the drain rate `anna outbox status` and the outbox gauges show
-- after an outage, and for the purge of old published rows (which otherwise scans the table).
CREATE INDEX IF NOT EXISTS outbox_events_published_at_idx ON outbox_events (published_at)
    WHERE status = 'published';

-- The claim now reads the head of the outbox in insertion order (outbox_events_claim_idx) and
-- judges every row there itself; nothing probes an aggregate's blockers any more, and these two
-- indexes only slowed every append, claim and publish down.
DROP INDEX IF EXISTS outbox_events_pending_aggregate_idx;
DROP INDEX IF EXISTS outbox_events_processing_aggregate_idx;

-- The claim reads again, once locked, the rows still to publish of the aggregates it picked
-- (a row committed late may stand before a picked one): one index range per aggregate.
CREATE INDEX IF NOT EXISTS outbox_events_unpublished_aggregate_idx ON outbox_events (aggregate_id, seq)
    WHERE status IN ('pending', 'processing');

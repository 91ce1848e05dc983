-- Webhooks: a tenant's endpoints, and one delivery per (endpoint, event) with its attempts.
-- Deliveries are the durable queue of the webhook dispatchers and the tenant's delivery log.

CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    url TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    -- Event names, prefixes ending in ".*", or "*".
    event_filter TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    -- Events of one aggregate delivered one after the other.
    ordered INTEGER NOT NULL,
    -- Signing secrets, sealed (never in clear); the previous one signs until it expires.
    secret_sealed TEXT NOT NULL,
    previous_secret_sealed TEXT,
    previous_secret_expires_at INTEGER,
    -- The circuit breaker: consecutive failures, and while open_until is in the future no
    -- delivery is attempted.
    circuit_failures INTEGER NOT NULL DEFAULT 0,
    -- How often it opened since the last success: each failed probe doubles the open time.
    circuit_openings INTEGER NOT NULL DEFAULT 0,
    circuit_open_until INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX webhook_endpoints_tenant_idx ON webhook_endpoints (tenant_id, created_at);

CREATE TABLE webhook_deliveries (
    -- UUIDv7: the delivery log pages by it, newest first.
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL,
    -- The webhook-id header: the receiver's idempotency key.
    event_id TEXT NOT NULL,
    event_name TEXT NOT NULL,
    -- Deliveries of one key (the event's aggregate) go in `position` order on ordered endpoints;
    -- `position` is the event's place in the domain-event stream.
    ordering_key TEXT NOT NULL,
    position TEXT NOT NULL,
    ordered INTEGER NOT NULL,
    -- The exact bytes every attempt sends.
    body TEXT NOT NULL,
    -- pending | delivering | succeeded | dead
    status TEXT NOT NULL,
    -- Attempts in all, and since creation or the last replay (backoff and the attempt limit).
    attempts INTEGER NOT NULL DEFAULT 0,
    round_attempts INTEGER NOT NULL DEFAULT 0,
    -- Pending: due at this time; delivering: the claim's lease ends then.
    next_attempt_at INTEGER NOT NULL,
    deadline_at INTEGER NOT NULL,
    occurred_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    last_status_code INTEGER,
    last_latency_ms INTEGER,
    last_error TEXT,
    last_response_body TEXT
);
-- One delivery per endpoint and event, however often the event is fanned out.
CREATE UNIQUE INDEX webhook_deliveries_event_idx ON webhook_deliveries (endpoint_id, event_id);
-- The dispatchers' claim: due deliveries by time.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'delivering');
-- Purging finished deliveries past their retention.
CREATE INDEX webhook_deliveries_completed_idx ON webhook_deliveries (completed_at)
    WHERE status IN ('succeeded', 'dead');
-- The delivery log of an endpoint, newest first.
CREATE INDEX webhook_deliveries_log_idx ON webhook_deliveries (endpoint_id, id);
-- Ordered endpoints: the earliest unfinished delivery of a key.
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (endpoint_id, ordering_key, position)
    WHERE status IN ('pending', 'delivering');

CREATE TABLE webhook_delivery_attempts (
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    attempted_at INTEGER NOT NULL,
    status_code INTEGER,
    latency_ms INTEGER NOT NULL,
    error TEXT,
    response_body TEXT,
    PRIMARY KEY (delivery_id, attempt)
);

-- Webhooks: a tenant's endpoints, and one delivery per (endpoint, event) with its attempts.
-- Deliveries are the durable queue of the webhook dispatchers and the tenant's delivery log.

CREATE TABLE webhook_endpoints (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL,
    url text NOT NULL,
    description text NOT NULL DEFAULT '',
    -- Event names, prefixes ending in ".*", or "*".
    event_filter jsonb NOT NULL,
    enabled boolean NOT NULL,
    -- Events of one aggregate delivered one after the other.
    ordered boolean NOT NULL,
    -- Signing secrets, sealed (never in clear); the previous one signs until it expires.
    secret_sealed text NOT NULL,
    previous_secret_sealed text,
    previous_secret_expires_at timestamptz,
    -- The circuit breaker: consecutive failures, and while open_until is in the future no
    -- delivery is attempted.
    circuit_failures integer NOT NULL DEFAULT 0,
    -- How often it opened since the last success: each failed probe doubles the open time.
    circuit_openings integer NOT NULL DEFAULT 0,
    circuit_open_until timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX webhook_endpoints_tenant_idx ON webhook_endpoints (tenant_id, created_at);

CREATE TABLE webhook_deliveries (
    -- UUIDv7: the delivery log pages by it, newest first.
    id uuid PRIMARY KEY,
    endpoint_id uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    tenant_id uuid NOT NULL,
    -- The webhook-id header: the receiver's idempotency key.
    event_id uuid NOT NULL,
    event_name text NOT NULL,
    -- Deliveries of one key (the event's aggregate) go in `position` order on ordered endpoints;
    -- `position` is the event's place in the domain-event stream.
    ordering_key text NOT NULL,
    position text NOT NULL,
    ordered boolean NOT NULL,
    -- The exact bytes every attempt sends.
    body text NOT NULL,
    -- pending | delivering | succeeded | dead
    status text NOT NULL,
    -- Attempts in all, and since creation or the last replay (backoff and the attempt limit).
    attempts integer NOT NULL DEFAULT 0,
    round_attempts integer NOT NULL DEFAULT 0,
    -- Pending: due at this time; delivering: the claim's lease ends then.
    next_attempt_at timestamptz NOT NULL,
    deadline_at timestamptz NOT NULL,
    occurred_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    completed_at timestamptz,
    last_status_code integer,
    last_latency_ms integer,
    last_error text,
    last_response_body text
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
    delivery_id uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    status_code integer,
    latency_ms integer NOT NULL,
    error text,
    response_body text,
    PRIMARY KEY (delivery_id, attempt)
);

-- The sessions fleet: which sessions worker holds which partition of the sessions, for how
-- long, and under which fencing token. Times are milliseconds since the epoch on the
-- database's own clock, so workers on machines whose clocks disagree still agree on expiry.

CREATE TABLE session_partition_leases (
    partition integer PRIMARY KEY,
    -- NULL once released; kept after an expiry so `anna fleet status` can say who held it.
    worker_id text,
    -- Grows by one at every acquisition and is never reset: a write carrying an older token
    -- comes from a stale owner and is refused.
    token bigint NOT NULL DEFAULT 0,
    acquired_at_ms bigint NOT NULL DEFAULT 0,
    renewed_at_ms bigint NOT NULL DEFAULT 0,
    -- Free when this is in the past.
    expires_at_ms bigint NOT NULL DEFAULT 0
);

-- Sessions workers announce themselves with a heartbeat; the live ones share the partitions.
CREATE TABLE session_workers (
    worker_id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    -- SESSIONS_PARTITIONS as this worker sees it: workers that disagree must not share.
    partitions integer NOT NULL,
    started_at_ms bigint NOT NULL,
    heartbeat_at_ms bigint NOT NULL,
    expires_at_ms bigint NOT NULL
);

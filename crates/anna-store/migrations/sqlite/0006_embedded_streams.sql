-- The embedded event streams (anna-streams' EmbeddedStream): Redis Streams semantics on the
-- application's SQLite file, for single-binary deployments without Redis.
--
-- Entry ids are shown as "<id>-0", where id comes from stream_entries' AUTOINCREMENT key: unlike
-- a plain rowid, AUTOINCREMENT never hands an id out again after the newest rows were trimmed,
-- so ids only grow, like Redis ids. The sequence is shared by all streams, so a stream's ids
-- increase but are not contiguous. Ids are compared as integers, never as text.

CREATE TABLE stream_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    -- JSON object of string fields to string values.
    fields TEXT NOT NULL
);

-- Reads in id order within a stream, XLEN, the newest id, trimming.
CREATE INDEX stream_entries_stream_id_idx ON stream_entries (stream, id);

-- A consumer group: everything with id > last_delivered_id is still to be delivered to it.
-- A new group starts at 0, so it sees the backlog.
CREATE TABLE stream_groups (
    stream TEXT NOT NULL,
    group_name TEXT NOT NULL,
    last_delivered_id INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stream, group_name)
) WITHOUT ROWID;

-- The pending entries list: delivered to a consumer of a group, not yet acknowledged.
-- delivered_at is unix milliseconds of the last delivery (idle time = now - delivered_at).
-- Trimming never removes an entry that still has rows here.
CREATE TABLE stream_pending (
    stream TEXT NOT NULL,
    group_name TEXT NOT NULL,
    entry_id INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    delivery_count INTEGER NOT NULL,
    delivered_at INTEGER NOT NULL,
    PRIMARY KEY (stream, group_name, entry_id)
) WITHOUT ROWID;

-- Claims look for entries idle for long enough.
CREATE INDEX stream_pending_idle_idx ON stream_pending (stream, group_name, delivered_at);
-- The trim point: the oldest entry any group of a stream still has pending.
CREATE INDEX stream_pending_stream_entry_idx ON stream_pending (stream, entry_id);

-- The embedded streams (the SQLite stand-in for Redis Streams) live only in SQLite: a Postgres
-- deployment uses Redis. This placeholder keeps the migration numbers of both backends in step.
SELECT 1;

-- See the Postgres migration of the same number.
ALTER TABLE session_messages ADD COLUMN forwarding_score INTEGER;

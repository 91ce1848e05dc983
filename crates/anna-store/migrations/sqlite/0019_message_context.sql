-- See the Postgres migration of the same number.
ALTER TABLE session_messages ADD COLUMN reply_to_message_id TEXT;
ALTER TABLE session_messages ADD COLUMN reply_to_participant TEXT;
ALTER TABLE session_messages ADD COLUMN mentions TEXT;

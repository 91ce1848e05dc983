-- What a message answers and whom it mentions: the message it replies to (and who sent that
-- one), and the mentioned JIDs as a JSON array. The predecessor read them out of its raw
-- message; anna keeps them as columns.
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS reply_to_message_id text;
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS reply_to_participant text;
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS mentions text;

-- A forwarded message: how many times it was forwarded on its way (NULL: not a forward).
ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS forwarding_score integer;

-- Access tokens carry the generation of their user's tokens when they were issued; logging
-- out everywhere and resetting the password move it on, so every access token issued before
-- stops working at once instead of living until it expires. Tokens issued before this column
-- existed carry none and count as generation 0.
ALTER TABLE users ADD COLUMN token_generation bigint NOT NULL DEFAULT 0;

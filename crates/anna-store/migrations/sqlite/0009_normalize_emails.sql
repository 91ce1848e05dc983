-- E-mails in an anna SQLite database were always stored normalised (the predecessor ran on
-- Postgres only); this version exists to keep both migration histories in step.
SELECT 1;

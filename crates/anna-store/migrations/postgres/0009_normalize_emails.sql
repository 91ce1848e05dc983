-- The predecessor stored e-mails as typed; anna stores and looks them up trimmed and
-- lower-cased. Normalise existing rows so their owners can still log in. Where several rows
-- normalise to one address, or the normalised address is already taken, only one keeps it (an
-- active account first, then the most recent login, then the oldest); the others stay as they
-- are — unreachable by login until an operator merges them — rather than failing the migration.
WITH candidates AS (
    SELECT id,
           lower(btrim(email)) AS normalized,
           row_number() OVER (
               PARTITION BY lower(btrim(email))
               ORDER BY (status = 'active') DESC, last_login_at DESC NULLS LAST, created_at
           ) AS rank
    FROM users
    WHERE email <> lower(btrim(email))
)
UPDATE users u
SET email = c.normalized
FROM candidates c
WHERE u.id = c.id
  AND c.rank = 1
  AND NOT EXISTS (SELECT 1 FROM users taken WHERE taken.email = c.normalized);

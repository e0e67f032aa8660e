-- Most jobs have no idempotency key: a partial unique index leaves them out, so inserting a job and each
-- of its state changes (none of which is a HOT update) write one index entry fewer. ON CONFLICT DO NOTHING
-- (without a target) still arbitrates on it, and lookups by key use it.
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key_key;
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;

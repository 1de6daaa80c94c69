-- Idempotency keys are optional and most jobs have none. A UNIQUE constraint indexes every
-- row, NULL keys included, so each job insert and each job status change (a status change
-- moves the row to a new version) paid an index entry for nothing. A partial unique index
-- keeps the guarantee for the keys that exist.
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key_key;
CREATE UNIQUE INDEX jobs_idempotency_key_idx ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

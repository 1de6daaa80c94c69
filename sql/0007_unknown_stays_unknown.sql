-- Unknown is not zero, unpriced is not $0.
--
-- A per-model row may hold NULL for a bucket or a cost its sender did not know (the wire's
-- modelUsage entry names such fields in "unreported"); before, the reference's required 0
-- was stored as a known zero. Executions and jobs count the calls that had no price, so a
-- total with some unpriced calls is reported as a lower bound, and one with none priced is
-- NULL, never $0.
ALTER TABLE execution_model_usage
    ALTER COLUMN input_tokens DROP NOT NULL,
    ALTER COLUMN output_tokens DROP NOT NULL,
    ALTER COLUMN cache_read_input_tokens DROP NOT NULL,
    ALTER COLUMN cache_creation_input_tokens DROP NOT NULL,
    ALTER COLUMN cost_usd DROP NOT NULL;
ALTER TABLE executions ADD COLUMN unpriced_calls integer NOT NULL DEFAULT 0
    CHECK (unpriced_calls >= 0);
ALTER TABLE jobs ADD COLUMN unpriced_calls integer NOT NULL DEFAULT 0
    CHECK (unpriced_calls >= 0);
-- Existing calls without a cost were unpriced all along.
UPDATE executions e SET unpriced_calls = s.n
FROM (SELECT execution_id, count(*) AS n FROM llm_calls WHERE cost_usd IS NULL
      GROUP BY execution_id) s
WHERE e.id = s.execution_id;
UPDATE jobs j SET unpriced_calls = s.n
FROM (SELECT job_id, sum(unpriced_calls) AS n FROM executions GROUP BY job_id) s
WHERE j.id = s.job_id AND s.n > 0;

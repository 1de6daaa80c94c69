-- Every attempt ends, whatever the orchestrator refuses (issue 25).
--
-- executions.error_class 'invalid_result': the attempt's job:result failed validation, so the
-- orchestrator recorded the attempt itself, failed, without totals (its usage is the sum of
-- its recorded calls). Not a provider fault: the job is not retried for it.
ALTER TABLE executions DROP CONSTRAINT executions_error_class_check;
ALTER TABLE executions ADD CONSTRAINT executions_error_class_check
    CHECK (error_class IN ('retryable', 'permanent', 'invalid_result'));

-- llm_calls.usage_inconsistent: the provider's usage for the call contradicted itself (more
-- cached than prompt tokens, a count that is not a count; job:generation usageInconsistent).
-- The call is recorded all the same: the buckets that could not be trusted are NULL.
ALTER TABLE llm_calls ADD COLUMN usage_inconsistent boolean NOT NULL DEFAULT false;

-- A failed attempt says whether another may succeed: 'retryable' (provider overload, rate
-- limit, server error, request timeout, connection) re-queues its job with a backoff while
-- attempts remain; 'permanent' fails it at once. NULL: not a failure, or a daemon of an
-- earlier release (its failures end the job, as before).
ALTER TABLE executions ADD COLUMN error_class text
    CHECK (error_class IN ('retryable', 'permanent'));

-- The ledger: daemons, jobs, executions (one per attempt), per-model usage and LLM calls.
-- Token columns are BIGINT and NULL when the provider did not report them.

CREATE TABLE daemons (
    id                  text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 200),
    hostname            text NOT NULL,
    version             text NOT NULL,
    executors           jsonb NOT NULL DEFAULT '[]'::jsonb,
    max_concurrent_jobs integer NOT NULL CHECK (max_concurrent_jobs >= 0),
    labels              jsonb NOT NULL DEFAULT '{}'::jsonb,
    status              text NOT NULL CHECK (status IN ('connected', 'draining', 'disconnected')),
    orchestrator_id     text,
    first_seen_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id                          uuid PRIMARY KEY,
    queue                       text NOT NULL DEFAULT 'default',
    executor                    text NOT NULL,
    model                       text,
    spec                        jsonb NOT NULL DEFAULT '{}'::jsonb,
    limits                      jsonb NOT NULL DEFAULT '{}'::jsonb,
    labels                      jsonb NOT NULL DEFAULT '{}'::jsonb,
    status                      text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority                    integer NOT NULL DEFAULT 0,
    attempts                    integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts                integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    idempotency_key             text UNIQUE,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    available_at                timestamptz NOT NULL DEFAULT now(),
    started_at                  timestamptz,
    finished_at                 timestamptz,
    cancel_requested            boolean NOT NULL DEFAULT false,
    error                       text,
    stop_reason                 text,
    num_turns                   integer CHECK (num_turns >= 0),
    input_tokens                bigint CHECK (input_tokens >= 0),
    output_tokens               bigint CHECK (output_tokens >= 0),
    cache_read_input_tokens     bigint CHECK (cache_read_input_tokens >= 0),
    cache_creation_input_tokens bigint CHECK (cache_creation_input_tokens >= 0),
    reasoning_tokens            bigint CHECK (reasoning_tokens >= 0),
    cost_usd                    numeric CHECK (cost_usd >= 0)
);

CREATE INDEX jobs_dispatch_idx ON jobs (queue, priority DESC, available_at, created_at)
    WHERE status = 'queued';
CREATE INDEX jobs_finished_at_idx ON jobs (finished_at);
CREATE INDEX jobs_created_at_idx ON jobs (created_at);
CREATE INDEX jobs_model_idx ON jobs (model);

CREATE TABLE executions (
    id                          uuid PRIMARY KEY,
    job_id                      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt                     integer NOT NULL CHECK (attempt >= 1),
    daemon_id                   text NOT NULL REFERENCES daemons (id),
    status                      text NOT NULL
        CHECK (status IN ('offered', 'running', 'succeeded', 'failed', 'lost', 'cancelled',
                          'rejected')),
    lease_expires_at            timestamptz,
    offered_at                  timestamptz NOT NULL DEFAULT now(),
    started_at                  timestamptz,
    finished_at                 timestamptz,
    result_recorded_at          timestamptz,
    error                       text,
    stop_reason                 text,
    duration_ms                 double precision CHECK (duration_ms >= 0),
    num_turns                   integer CHECK (num_turns >= 0),
    input_tokens                bigint CHECK (input_tokens >= 0),
    output_tokens               bigint CHECK (output_tokens >= 0),
    cache_read_input_tokens     bigint CHECK (cache_read_input_tokens >= 0),
    cache_creation_input_tokens bigint CHECK (cache_creation_input_tokens >= 0),
    reasoning_tokens            bigint CHECK (reasoning_tokens >= 0),
    tokens_unavailable          boolean NOT NULL DEFAULT false,
    cost_usd                    numeric CHECK (cost_usd >= 0),
    cost_source                 text
        CHECK (cost_source IN ('provider', 'sdk_estimate', 'price_table', 'unpriced', 'local')),
    model_usage                 jsonb
);

CREATE INDEX executions_job_idx ON executions (job_id);
CREATE INDEX executions_lease_idx ON executions (lease_expires_at)
    WHERE status IN ('offered', 'running');
CREATE INDEX executions_daemon_active_idx ON executions (daemon_id)
    WHERE status IN ('offered', 'running');
CREATE INDEX executions_finished_at_idx ON executions (finished_at);

CREATE TABLE execution_model_usage (
    execution_id                uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    model                       text NOT NULL CHECK (length(model) > 0),
    provider                    text,
    input_tokens                bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens               bigint NOT NULL CHECK (output_tokens >= 0),
    cache_read_input_tokens     bigint NOT NULL CHECK (cache_read_input_tokens >= 0),
    cache_creation_input_tokens bigint NOT NULL CHECK (cache_creation_input_tokens >= 0),
    reasoning_tokens            bigint CHECK (reasoning_tokens >= 0),
    cost_usd                    numeric NOT NULL CHECK (cost_usd >= 0),
    PRIMARY KEY (execution_id, model)
);

CREATE INDEX execution_model_usage_model_idx ON execution_model_usage (model);

CREATE TABLE llm_calls (
    execution_id                uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    seq                         integer NOT NULL CHECK (seq >= 0),
    provider                    text NOT NULL,
    request_model               text,
    response_model              text,
    finish_reason               text,
    input_tokens                bigint CHECK (input_tokens >= 0),
    output_tokens               bigint CHECK (output_tokens >= 0),
    cache_read_input_tokens     bigint CHECK (cache_read_input_tokens >= 0),
    cache_creation_input_tokens bigint CHECK (cache_creation_input_tokens >= 0),
    reasoning_tokens            bigint CHECK (reasoning_tokens >= 0),
    tokens_unavailable          boolean NOT NULL DEFAULT false,
    cost_usd                    numeric CHECK (cost_usd >= 0),
    cost_source                 text
        CHECK (cost_source IN ('provider', 'sdk_estimate', 'price_table', 'unpriced', 'local')),
    duration_ms                 double precision CHECK (duration_ms >= 0),
    request_id                  text,
    recorded_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (execution_id, seq)
);

CREATE INDEX llm_calls_recorded_at_idx ON llm_calls (recorded_at);
CREATE INDEX llm_calls_model_idx ON llm_calls (response_model);

-- Every job status change and every new queued job is announced to all orchestrators.
CREATE FUNCTION tally_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status
       OR NEW.cancel_requested IS DISTINCT FROM OLD.cancel_requested THEN
        -- payload: "<job id> <status> <cancel|-> <queue>" (the queue last: it may hold spaces)
        PERFORM pg_notify('tally_jobs', NEW.id::text || ' ' || NEW.status || ' '
                          || CASE WHEN NEW.cancel_requested THEN 'cancel' ELSE '-' END
                          || ' ' || NEW.queue);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION tally_notify_job();

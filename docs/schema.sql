-- The current schema: what `tally migrate up` makes of sql/0001..NNNN, dumped by
-- pg_dump --schema-only. Generated (TALLY_UPDATE_SNAPSHOT=1 pytest tests/test_map.py);
-- read it, never apply it: the migrations are the source.

CREATE FUNCTION public.tally_is_time_zone(name text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE
    AS $$
BEGIN
    PERFORM timestamptz '2000-01-01 00:00:00+00' AT TIME ZONE name;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;

CREATE FUNCTION public.tally_notify_jobs() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    payload text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR payload IN
            SELECT string_agg(line, E'\n')
            FROM (SELECT n.id::text || ' ' || n.status || ' '
                         || CASE WHEN n.cancel_requested THEN 'cancel' ELSE '-' END AS line,
                         (row_number() OVER () - 1) / 100 AS chunk
                  FROM new_rows n) lines
            GROUP BY chunk
        LOOP
            PERFORM pg_notify('tally_jobs', payload);
        END LOOP;
    ELSE
        FOR payload IN
            SELECT string_agg(line, E'\n')
            FROM (SELECT n.id::text || ' ' || n.status || ' '
                         || CASE WHEN n.cancel_requested THEN 'cancel' ELSE '-' END AS line,
                         (row_number() OVER () - 1) / 100 AS chunk
                  FROM new_rows n JOIN old_rows o ON o.id = n.id
                  WHERE n.status IS DISTINCT FROM o.status
                     OR n.cancel_requested IS DISTINCT FROM o.cancel_requested) lines
            GROUP BY chunk
        LOOP
            PERFORM pg_notify('tally_jobs', payload);
        END LOOP;
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION public.tally_usage_contributions(p_from timestamp with time zone, p_to timestamp with time zone) RETURNS TABLE(hour timestamp with time zone, model text, provider text, executor text, labels jsonb, input_tokens numeric, output_tokens numeric, cache_read_input_tokens numeric, cache_creation_input_tokens numeric, reasoning_tokens numeric, cost_usd numeric, calls bigint, executions bigint, unpriced_calls bigint, unreported_input bigint, unreported_output bigint, unreported_cache_read bigint, unreported_cache_creation bigint, unreported_reasoning bigint)
    LANGUAGE sql STABLE
    AS $$
WITH call_rows AS (
    SELECT c.*, e.result_recorded_at, j.executor AS job_executor, j.labels AS job_labels,
           coalesce(c.response_model, c.request_model, j.model, j.executor) AS call_model,
           (e.result_recorded_at IS NULL OR c.recorded_at <= e.result_recorded_at) AS counted
    FROM llm_calls c
    JOIN executions e ON e.id = c.execution_id
    JOIN jobs j ON j.id = e.job_id
    WHERE c.recorded_at >= p_from AND c.recorded_at < p_to
), results AS (
    SELECT e.*, date_trunc('hour', e.result_recorded_at, 'UTC') AS at_hour,
           j.executor AS job_executor, j.labels AS job_labels,
           coalesce(j.model, j.executor) AS job_model,
           EXISTS (SELECT 1 FROM execution_model_usage m WHERE m.execution_id = e.id)
               AS has_entries
    FROM executions e
    JOIN jobs j ON j.id = e.job_id
    WHERE e.result_recorded_at >= p_from AND e.result_recorded_at < p_to
), before AS (
    SELECT r.id, coalesce(c.response_model, c.request_model, r.job_model) AS model,
           c.provider,
           sum(c.input_tokens) AS input_tokens, sum(c.output_tokens) AS output_tokens,
           sum(c.cache_read_input_tokens) AS cache_read_input_tokens,
           sum(c.cache_creation_input_tokens) AS cache_creation_input_tokens,
           sum(c.reasoning_tokens) AS reasoning_tokens, sum(c.cost_usd) AS cost_usd,
           count(*) FILTER (WHERE c.cost_usd IS NULL) AS unpriced, count(*) AS n
    FROM results r
    JOIN llm_calls c ON c.execution_id = r.id AND c.recorded_at <= r.result_recorded_at
    GROUP BY 1, 2, 3
), before_total AS (
    SELECT id, sum(unpriced) AS unpriced, sum(n) AS n FROM before GROUP BY id
)
SELECT date_trunc('hour', c.recorded_at, 'UTC'), c.call_model, c.provider, c.job_executor,
       c.job_labels,
       CASE WHEN c.counted THEN c.input_tokens END,
       CASE WHEN c.counted THEN c.output_tokens END,
       CASE WHEN c.counted THEN c.cache_read_input_tokens END,
       CASE WHEN c.counted THEN c.cache_creation_input_tokens END,
       CASE WHEN c.counted THEN c.reasoning_tokens END,
       CASE WHEN c.counted THEN c.cost_usd END,
       1::bigint,
       (c.counted AND NOT EXISTS (
            SELECT 1 FROM llm_calls x WHERE x.execution_id = c.execution_id
              AND (x.recorded_at, x.seq) < (c.recorded_at, c.seq)))::int::bigint,
       (c.counted AND c.cost_usd IS NULL)::int::bigint,
       (c.counted AND c.input_tokens IS NULL)::int::bigint,
       (c.counted AND c.output_tokens IS NULL)::int::bigint,
       (c.counted AND c.cache_read_input_tokens IS NULL)::int::bigint,
       (c.counted AND c.cache_creation_input_tokens IS NULL)::int::bigint,
       (c.counted AND c.reasoning_tokens IS NULL)::int::bigint
FROM call_rows c
UNION ALL
SELECT r.at_hour, r.job_model, r.job_executor, r.job_executor, r.job_labels,
       r.input_tokens, r.output_tokens, r.cache_read_input_tokens,
       r.cache_creation_input_tokens, r.reasoning_tokens, r.cost_usd,
       0, (coalesce(b.n, 0) = 0)::int, r.unpriced_calls - coalesce(b.unpriced, 0),
       0, 0, 0, 0, 0
FROM results r LEFT JOIN before_total b ON b.id = r.id
UNION ALL
SELECT r.at_hour, m.model, coalesce(m.provider, r.job_executor), r.job_executor,
       r.job_labels, m.input_tokens, m.output_tokens, m.cache_read_input_tokens,
       m.cache_creation_input_tokens, m.reasoning_tokens, m.cost_usd, 0, 0, 0, 0, 0, 0, 0, 0
FROM results r JOIN execution_model_usage m ON m.execution_id = r.id
UNION ALL
SELECT r.at_hour, r.job_model, r.job_executor, r.job_executor, r.job_labels,
       CASE WHEN r.input_tokens IS NOT NULL THEN -m.input_tokens END,
       CASE WHEN r.output_tokens IS NOT NULL THEN -m.output_tokens END,
       CASE WHEN r.cache_read_input_tokens IS NOT NULL THEN -m.cache_read_input_tokens END,
       CASE WHEN r.cache_creation_input_tokens IS NOT NULL
            THEN -m.cache_creation_input_tokens END,
       CASE WHEN r.reasoning_tokens IS NOT NULL THEN -m.reasoning_tokens END,
       CASE WHEN r.cost_usd IS NOT NULL THEN -m.cost_usd END, 0, 0, 0, 0, 0, 0, 0, 0
FROM results r JOIN execution_model_usage m ON m.execution_id = r.id
UNION ALL
SELECT r.at_hour,
       CASE WHEN r.has_entries THEN b.model ELSE r.job_model END,
       CASE WHEN r.has_entries THEN b.provider ELSE r.job_executor END,
       r.job_executor, r.job_labels,
       CASE WHEN r.has_entries OR r.input_tokens IS NOT NULL THEN -b.input_tokens END,
       CASE WHEN r.has_entries OR r.output_tokens IS NOT NULL THEN -b.output_tokens END,
       CASE WHEN r.has_entries OR r.cache_read_input_tokens IS NOT NULL
            THEN -b.cache_read_input_tokens END,
       CASE WHEN r.has_entries OR r.cache_creation_input_tokens IS NOT NULL
            THEN -b.cache_creation_input_tokens END,
       CASE WHEN r.has_entries OR r.reasoning_tokens IS NOT NULL THEN -b.reasoning_tokens END,
       CASE WHEN r.has_entries OR r.cost_usd IS NOT NULL THEN -b.cost_usd END,
       0, 0, 0, 0, 0, 0, 0, 0
FROM results r JOIN before b ON b.id = r.id
$$;

CREATE TABLE public.budget_reservations (
    budget text NOT NULL,
    execution_id uuid NOT NULL,
    amount_usd numeric NOT NULL,
    tokens bigint,
    CONSTRAINT budget_reservations_amount_usd_check CHECK ((amount_usd >= (0)::numeric)),
    CONSTRAINT budget_reservations_tokens_check CHECK ((tokens >= 0))
);

CREATE TABLE public.budgets (
    name text NOT NULL,
    selector jsonb DEFAULT '{}'::jsonb NOT NULL,
    limit_usd numeric NOT NULL,
    limit_tokens bigint,
    period text NOT NULL,
    time_zone text DEFAULT 'UTC'::text NOT NULL,
    action text NOT NULL,
    soft_ratio numeric DEFAULT 0.8 NOT NULL,
    default_reservation_usd numeric NOT NULL,
    default_reservation_tokens bigint,
    refuse_unpriced boolean DEFAULT false NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT budgets_action_check CHECK ((action = ANY (ARRAY['hold'::text, 'fail'::text]))),
    CONSTRAINT budgets_default_reservation_tokens_check CHECK ((default_reservation_tokens > 0)),
    CONSTRAINT budgets_default_reservation_usd_check CHECK ((default_reservation_usd > (0)::numeric)),
    CONSTRAINT budgets_limit_tokens_check CHECK ((limit_tokens >= 0)),
    CONSTRAINT budgets_limit_usd_check CHECK ((limit_usd >= (0)::numeric)),
    CONSTRAINT budgets_name_check CHECK (((length(name) >= 1) AND (length(name) <= 256))),
    CONSTRAINT budgets_period_check CHECK ((period = ANY (ARRAY['day'::text, 'week'::text, 'month'::text, 'lifetime'::text]))),
    CONSTRAINT budgets_selector_check CHECK ((jsonb_typeof(selector) = 'object'::text)),
    CONSTRAINT budgets_soft_ratio_check CHECK (((soft_ratio > (0)::numeric) AND (soft_ratio <= (1)::numeric)))
);

CREATE TABLE public.daemons (
    id text NOT NULL,
    hostname text NOT NULL,
    version text NOT NULL,
    executors jsonb DEFAULT '[]'::jsonb NOT NULL,
    max_concurrent_jobs integer NOT NULL,
    labels jsonb DEFAULT '{}'::jsonb NOT NULL,
    status text NOT NULL,
    orchestrator_id text,
    first_seen_at timestamp with time zone DEFAULT now() NOT NULL,
    last_seen_at timestamp with time zone DEFAULT now() NOT NULL,
    token_fingerprint text,
    CONSTRAINT daemons_id_check CHECK (((length(id) >= 1) AND (length(id) <= 200))),
    CONSTRAINT daemons_max_concurrent_jobs_check CHECK ((max_concurrent_jobs >= 0)),
    CONSTRAINT daemons_status_check CHECK ((status = ANY (ARRAY['connected'::text, 'draining'::text, 'disconnected'::text])))
);

CREATE TABLE public.execution_model_usage (
    execution_id uuid NOT NULL,
    model text NOT NULL,
    provider text,
    input_tokens bigint,
    output_tokens bigint,
    cache_read_input_tokens bigint,
    cache_creation_input_tokens bigint,
    reasoning_tokens bigint,
    cost_usd numeric,
    CONSTRAINT execution_model_usage_cache_creation_input_tokens_check CHECK ((cache_creation_input_tokens >= 0)),
    CONSTRAINT execution_model_usage_cache_read_input_tokens_check CHECK ((cache_read_input_tokens >= 0)),
    CONSTRAINT execution_model_usage_cost_usd_check CHECK ((cost_usd >= (0)::numeric)),
    CONSTRAINT execution_model_usage_input_tokens_check CHECK ((input_tokens >= 0)),
    CONSTRAINT execution_model_usage_model_check CHECK ((length(model) > 0)),
    CONSTRAINT execution_model_usage_output_tokens_check CHECK ((output_tokens >= 0)),
    CONSTRAINT execution_model_usage_reasoning_tokens_check CHECK ((reasoning_tokens >= 0))
);

CREATE TABLE public.executions (
    id uuid NOT NULL,
    job_id uuid NOT NULL,
    attempt integer NOT NULL,
    daemon_id text NOT NULL,
    status text NOT NULL,
    lease_expires_at timestamp with time zone,
    offered_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    result_recorded_at timestamp with time zone,
    error text,
    stop_reason text,
    duration_ms double precision,
    num_turns integer,
    input_tokens bigint,
    output_tokens bigint,
    cache_read_input_tokens bigint,
    cache_creation_input_tokens bigint,
    reasoning_tokens bigint,
    tokens_unavailable boolean DEFAULT false NOT NULL,
    cost_usd numeric,
    cost_source text,
    model_usage jsonb,
    unpriced_calls integer DEFAULT 0 NOT NULL,
    cache_creation_1h_input_tokens bigint,
    error_class text,
    output text,
    output_format text,
    output_truncated boolean DEFAULT false NOT NULL,
    otlp_pending boolean DEFAULT true NOT NULL,
    otlp_exported_at timestamp with time zone,
    offered_limits jsonb,
    lease_renewed_at timestamp with time zone,
    counted_until timestamp with time zone,
    CONSTRAINT executions_attempt_check CHECK ((attempt >= 1)),
    CONSTRAINT executions_cache_creation_1h_input_tokens_check CHECK ((cache_creation_1h_input_tokens >= 0)),
    CONSTRAINT executions_cache_creation_input_tokens_check CHECK ((cache_creation_input_tokens >= 0)),
    CONSTRAINT executions_cache_read_input_tokens_check CHECK ((cache_read_input_tokens >= 0)),
    CONSTRAINT executions_cost_source_check CHECK ((cost_source = ANY (ARRAY['provider'::text, 'sdk_estimate'::text, 'price_table'::text, 'price_override'::text, 'unpriced'::text, 'local'::text]))),
    CONSTRAINT executions_cost_usd_check CHECK ((cost_usd >= (0)::numeric)),
    CONSTRAINT executions_duration_ms_check CHECK ((duration_ms >= (0)::double precision)),
    CONSTRAINT executions_error_class_check CHECK ((error_class = ANY (ARRAY['retryable'::text, 'permanent'::text, 'invalid_result'::text]))),
    CONSTRAINT executions_input_tokens_check CHECK ((input_tokens >= 0)),
    CONSTRAINT executions_num_turns_check CHECK ((num_turns >= 0)),
    CONSTRAINT executions_output_format_check CHECK ((output_format = ANY (ARRAY['text'::text, 'json'::text]))),
    CONSTRAINT executions_output_tokens_check CHECK ((output_tokens >= 0)),
    CONSTRAINT executions_reasoning_tokens_check CHECK ((reasoning_tokens >= 0)),
    CONSTRAINT executions_status_check CHECK ((status = ANY (ARRAY['offered'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'lost'::text, 'cancelled'::text, 'rejected'::text]))),
    CONSTRAINT executions_unpriced_calls_check CHECK ((unpriced_calls >= 0))
);

CREATE TABLE public.jobs (
    id uuid NOT NULL,
    queue text DEFAULT 'default'::text NOT NULL,
    executor text NOT NULL,
    model text,
    spec jsonb DEFAULT '{}'::jsonb NOT NULL,
    limits jsonb DEFAULT '{}'::jsonb NOT NULL,
    labels jsonb DEFAULT '{}'::jsonb NOT NULL,
    status text DEFAULT 'queued'::text NOT NULL,
    priority integer DEFAULT 0 NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer DEFAULT 3 NOT NULL,
    idempotency_key text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    available_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    cancel_requested boolean DEFAULT false NOT NULL,
    error text,
    stop_reason text,
    num_turns integer,
    input_tokens bigint,
    output_tokens bigint,
    cache_read_input_tokens bigint,
    cache_creation_input_tokens bigint,
    reasoning_tokens bigint,
    cost_usd numeric,
    unpriced_calls integer DEFAULT 0 NOT NULL,
    cache_creation_1h_input_tokens bigint,
    detail_pruned_at timestamp with time zone,
    hold_reason text,
    CONSTRAINT jobs_attempts_check CHECK ((attempts >= 0)),
    CONSTRAINT jobs_cache_creation_1h_input_tokens_check CHECK ((cache_creation_1h_input_tokens >= 0)),
    CONSTRAINT jobs_cache_creation_input_tokens_check CHECK ((cache_creation_input_tokens >= 0)),
    CONSTRAINT jobs_cache_read_input_tokens_check CHECK ((cache_read_input_tokens >= 0)),
    CONSTRAINT jobs_cost_usd_check CHECK ((cost_usd >= (0)::numeric)),
    CONSTRAINT jobs_input_tokens_check CHECK ((input_tokens >= 0)),
    CONSTRAINT jobs_max_attempts_check CHECK ((max_attempts >= 1)),
    CONSTRAINT jobs_num_turns_check CHECK ((num_turns >= 0)),
    CONSTRAINT jobs_output_tokens_check CHECK ((output_tokens >= 0)),
    CONSTRAINT jobs_reasoning_tokens_check CHECK ((reasoning_tokens >= 0)),
    CONSTRAINT jobs_status_check CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'succeeded'::text, 'failed'::text, 'cancelled'::text]))),
    CONSTRAINT jobs_unpriced_calls_check CHECK ((unpriced_calls >= 0))
);

CREATE TABLE public.ledger_retention (
    only_row boolean DEFAULT true NOT NULL,
    calls_before timestamp with time zone,
    executions_before timestamp with time zone,
    CONSTRAINT ledger_retention_only_row_check CHECK (only_row)
);

CREATE TABLE public.llm_calls (
    execution_id uuid NOT NULL,
    seq integer NOT NULL,
    provider text NOT NULL,
    request_model text,
    response_model text,
    finish_reason text,
    input_tokens bigint,
    output_tokens bigint,
    cache_read_input_tokens bigint,
    cache_creation_input_tokens bigint,
    reasoning_tokens bigint,
    tokens_unavailable boolean DEFAULT false NOT NULL,
    cost_usd numeric,
    cost_source text,
    duration_ms double precision,
    request_id text,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    cache_creation_1h_input_tokens bigint,
    started_at timestamp with time zone,
    usage_inconsistent boolean DEFAULT false NOT NULL,
    CONSTRAINT llm_calls_cache_creation_1h_input_tokens_check CHECK ((cache_creation_1h_input_tokens >= 0)),
    CONSTRAINT llm_calls_cache_creation_input_tokens_check CHECK ((cache_creation_input_tokens >= 0)),
    CONSTRAINT llm_calls_cache_read_input_tokens_check CHECK ((cache_read_input_tokens >= 0)),
    CONSTRAINT llm_calls_cost_source_check CHECK ((cost_source = ANY (ARRAY['provider'::text, 'sdk_estimate'::text, 'price_table'::text, 'price_override'::text, 'unpriced'::text, 'local'::text]))),
    CONSTRAINT llm_calls_cost_usd_check CHECK ((cost_usd >= (0)::numeric)),
    CONSTRAINT llm_calls_duration_ms_check CHECK ((duration_ms >= (0)::double precision)),
    CONSTRAINT llm_calls_input_tokens_check CHECK ((input_tokens >= 0)),
    CONSTRAINT llm_calls_output_tokens_check CHECK ((output_tokens >= 0)),
    CONSTRAINT llm_calls_reasoning_tokens_check CHECK ((reasoning_tokens >= 0)),
    CONSTRAINT llm_calls_seq_check CHECK ((seq >= 0))
);

CREATE TABLE public.tool_calls (
    execution_id uuid NOT NULL,
    seq integer NOT NULL,
    name text NOT NULL,
    after_call integer,
    started_at timestamp with time zone NOT NULL,
    duration_ms double precision NOT NULL,
    arguments_bytes bigint NOT NULL,
    result_bytes bigint NOT NULL,
    error boolean DEFAULT false NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT tool_calls_after_call_check CHECK ((after_call >= 0)),
    CONSTRAINT tool_calls_arguments_bytes_check CHECK ((arguments_bytes >= 0)),
    CONSTRAINT tool_calls_duration_ms_check CHECK ((duration_ms >= (0)::double precision)),
    CONSTRAINT tool_calls_result_bytes_check CHECK ((result_bytes >= 0)),
    CONSTRAINT tool_calls_seq_check CHECK ((seq >= 0))
);

CREATE TABLE public.usage_hourly (
    hour timestamp with time zone NOT NULL,
    model text NOT NULL,
    provider text NOT NULL,
    executor text NOT NULL,
    labels jsonb DEFAULT '{}'::jsonb NOT NULL,
    labels_key text GENERATED ALWAYS AS (md5((labels)::text)) STORED NOT NULL,
    input_tokens numeric,
    output_tokens numeric,
    cache_read_input_tokens numeric,
    cache_creation_input_tokens numeric,
    reasoning_tokens numeric,
    cost_usd numeric,
    calls bigint DEFAULT 0 NOT NULL,
    executions bigint DEFAULT 0 NOT NULL,
    unpriced_calls bigint DEFAULT 0 NOT NULL,
    unreported_input bigint DEFAULT 0 NOT NULL,
    unreported_output bigint DEFAULT 0 NOT NULL,
    unreported_cache_read bigint DEFAULT 0 NOT NULL,
    unreported_cache_creation bigint DEFAULT 0 NOT NULL,
    unreported_reasoning bigint DEFAULT 0 NOT NULL,
    shard smallint DEFAULT 0 NOT NULL,
    CONSTRAINT usage_hourly_hour_check CHECK ((hour = date_trunc('hour'::text, hour, 'UTC'::text))),
    CONSTRAINT usage_hourly_shard_check CHECK ((shard >= 0))
);

ALTER TABLE public.budget_reservations
    ADD CONSTRAINT budget_reservations_amount_usd_bounded CHECK ((amount_usd <= '1000000000'::numeric)) NOT VALID;

ALTER TABLE ONLY public.budget_reservations
    ADD CONSTRAINT budget_reservations_pkey PRIMARY KEY (budget, execution_id);

ALTER TABLE public.budgets
    ADD CONSTRAINT budgets_default_reservation_usd_bounded CHECK ((default_reservation_usd <= '1000000000'::numeric)) NOT VALID;

ALTER TABLE public.budgets
    ADD CONSTRAINT budgets_limit_usd_bounded CHECK ((limit_usd <= '1000000000'::numeric)) NOT VALID;

ALTER TABLE ONLY public.budgets
    ADD CONSTRAINT budgets_pkey PRIMARY KEY (name);

ALTER TABLE public.budgets
    ADD CONSTRAINT budgets_time_zone_known CHECK (public.tally_is_time_zone(time_zone)) NOT VALID;

ALTER TABLE ONLY public.daemons
    ADD CONSTRAINT daemons_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.execution_model_usage
    ADD CONSTRAINT execution_model_usage_pkey PRIMARY KEY (execution_id, model);

ALTER TABLE ONLY public.executions
    ADD CONSTRAINT executions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.ledger_retention
    ADD CONSTRAINT ledger_retention_pkey PRIMARY KEY (only_row);

ALTER TABLE ONLY public.llm_calls
    ADD CONSTRAINT llm_calls_pkey PRIMARY KEY (execution_id, seq);

ALTER TABLE ONLY public.tool_calls
    ADD CONSTRAINT tool_calls_pkey PRIMARY KEY (execution_id, seq);

ALTER TABLE ONLY public.usage_hourly
    ADD CONSTRAINT usage_hourly_pkey PRIMARY KEY (hour, executor, provider, model, labels_key, shard);

CREATE INDEX budget_reservations_execution_idx ON public.budget_reservations USING btree (execution_id);

CREATE INDEX executions_daemon_active_idx ON public.executions USING btree (daemon_id) WHERE (status = ANY (ARRAY['offered'::text, 'running'::text]));

CREATE INDEX executions_job_idx ON public.executions USING btree (job_id);

CREATE INDEX executions_lease_idx ON public.executions USING btree (lease_expires_at) WHERE (status = ANY (ARRAY['offered'::text, 'running'::text]));

CREATE INDEX executions_otlp_pending_idx ON public.executions USING btree (finished_at) WHERE (otlp_pending AND (status = ANY (ARRAY['succeeded'::text, 'failed'::text, 'lost'::text, 'cancelled'::text, 'rejected'::text])));

CREATE INDEX jobs_created_at_idx ON public.jobs USING btree (created_at);

CREATE INDEX jobs_dispatch_idx ON public.jobs USING btree (queue, priority DESC, available_at, created_at) WHERE (status = 'queued'::text);

CREATE UNIQUE INDEX jobs_idempotency_key_idx ON public.jobs USING btree (idempotency_key) WHERE (idempotency_key IS NOT NULL);

CREATE INDEX llm_calls_model_idx ON public.llm_calls USING btree (response_model);

CREATE INDEX llm_calls_recorded_at_idx ON public.llm_calls USING btree (recorded_at);

CREATE INDEX tool_calls_recorded_at_idx ON public.tool_calls USING btree (recorded_at);

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON public.jobs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION public.tally_notify_jobs();

CREATE TRIGGER jobs_notify_update AFTER UPDATE ON public.jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION public.tally_notify_jobs();

ALTER TABLE ONLY public.budget_reservations
    ADD CONSTRAINT budget_reservations_budget_fkey FOREIGN KEY (budget) REFERENCES public.budgets(name) ON DELETE CASCADE;

ALTER TABLE ONLY public.budget_reservations
    ADD CONSTRAINT budget_reservations_execution_id_fkey FOREIGN KEY (execution_id) REFERENCES public.executions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.execution_model_usage
    ADD CONSTRAINT execution_model_usage_execution_id_fkey FOREIGN KEY (execution_id) REFERENCES public.executions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.executions
    ADD CONSTRAINT executions_daemon_id_fkey FOREIGN KEY (daemon_id) REFERENCES public.daemons(id);

ALTER TABLE ONLY public.executions
    ADD CONSTRAINT executions_job_id_fkey FOREIGN KEY (job_id) REFERENCES public.jobs(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.llm_calls
    ADD CONSTRAINT llm_calls_execution_id_fkey FOREIGN KEY (execution_id) REFERENCES public.executions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.tool_calls
    ADD CONSTRAINT tool_calls_execution_id_fkey FOREIGN KEY (execution_id) REFERENCES public.executions(id) ON DELETE CASCADE;

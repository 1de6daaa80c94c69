-- Hourly rollups: reports read a table whose size grows with hours x models x label sets, not
-- with calls.
--
-- Each recorded call and each recorded result adds to the row of its (UTC hour, model,
-- provider, executor, label set), by the ledger writer, in the same transaction as the
-- detail rows (orchestrator/rollups.py, RECORD_RESULTS in orchestrator/store/ledger_sql.py).
-- What each adds is defined here, by tally_usage_contributions(): `tally ledger check`
-- proves the rollups equal the detail with it, and this migration backfills them from it.
--
-- Each ledger writer adds to its own shard of a key (writers never wait for each other on
-- the current hour's rows); `tally serve` folds the shards of past hours into shard 0, so a
-- past hour holds one row per key. Reports and the check sum over shards.
--
-- Sums are NUMERIC (no sum of BIGINT buckets can overflow them) and NULL while nothing that
-- was added reported the bucket (unknown is not zero). A contribution may be negative: when a
-- result's per-model entries replace its calls' models, the calls are taken back from their
-- models at the result's hour, so that over any window containing both the per-model totals
-- are the result's entries, as the ledger records them.
CREATE TABLE usage_hourly (
    hour                        timestamptz NOT NULL,
    model                       text NOT NULL,
    provider                    text NOT NULL,
    executor                    text NOT NULL,
    labels                      jsonb NOT NULL DEFAULT '{}'::jsonb,
    labels_key                  text GENERATED ALWAYS AS (md5(labels::text)) STORED,
    input_tokens                numeric,
    output_tokens               numeric,
    cache_read_input_tokens     numeric,
    cache_creation_input_tokens numeric,
    reasoning_tokens            numeric,
    cost_usd                    numeric,
    calls                       bigint NOT NULL DEFAULT 0,
    executions                  bigint NOT NULL DEFAULT 0,
    unpriced_calls              bigint NOT NULL DEFAULT 0,
    unreported_input            bigint NOT NULL DEFAULT 0,
    unreported_output           bigint NOT NULL DEFAULT 0,
    unreported_cache_read       bigint NOT NULL DEFAULT 0,
    unreported_cache_creation   bigint NOT NULL DEFAULT 0,
    unreported_reasoning        bigint NOT NULL DEFAULT 0,
    shard                       smallint NOT NULL DEFAULT 0 CHECK (shard >= 0),
    CONSTRAINT usage_hourly_hour_check CHECK (hour = date_trunc('hour', hour, 'UTC')),
    PRIMARY KEY (hour, executor, provider, model, labels_key, shard)
);

-- Detail older than this was pruned (`tally prune`): the check starts there.
CREATE TABLE ledger_retention (
    only_row          boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    calls_before      timestamptz,
    executions_before timestamptz
);
INSERT INTO ledger_retention DEFAULT VALUES;

-- A job whose executions were pruned keeps its totals; this says when its detail went.
ALTER TABLE jobs ADD COLUMN detail_pruned_at timestamptz;

-- Every contribution to the rollups of the hours in [p_from, p_to), one row each:
-- - a call: its buckets and cost under its model (response, request, the job's, the
--   executor), at the hour it was recorded; a call recorded after its execution's result
--   (outside the result's totals) counts as a call only;
-- - a result, at the hour it was recorded: its execution's totals under the job's model
--   (the job's model, else the executor; provider: the executor); its per-model entries
--   under their models, and taken from the job's model; its calls recorded up to it taken
--   from their models when it has entries, else from the job's model. A bucket is taken
--   from the job's model only where the totals know it. So over any window holding a whole
--   execution, each model holds what the result attributes to it, and the job's model what
--   the totals hold beyond the entries (or, without entries, beyond the calls).
-- An execution counts once: at its first call, else at its result. Unpriced calls count at
-- the call, and a result's own (a result without calls that has usage but no price) at it.
CREATE FUNCTION tally_usage_contributions(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (
    hour timestamptz, model text, provider text, executor text, labels jsonb,
    input_tokens numeric, output_tokens numeric, cache_read_input_tokens numeric,
    cache_creation_input_tokens numeric, reasoning_tokens numeric, cost_usd numeric,
    calls bigint, executions bigint, unpriced_calls bigint,
    unreported_input bigint, unreported_output bigint, unreported_cache_read bigint,
    unreported_cache_creation bigint, unreported_reasoning bigint
)
LANGUAGE sql STABLE AS $fn$
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
$fn$;

-- The rollups of the ledger as it stands.
INSERT INTO usage_hourly (hour, model, provider, executor, labels, input_tokens, output_tokens,
    cache_read_input_tokens, cache_creation_input_tokens, reasoning_tokens, cost_usd, calls,
    executions, unpriced_calls, unreported_input, unreported_output, unreported_cache_read,
    unreported_cache_creation, unreported_reasoning)
SELECT hour, model, provider, executor, labels, sum(input_tokens), sum(output_tokens),
       sum(cache_read_input_tokens), sum(cache_creation_input_tokens), sum(reasoning_tokens),
       sum(cost_usd), sum(calls), sum(executions), sum(unpriced_calls), sum(unreported_input),
       sum(unreported_output), sum(unreported_cache_read), sum(unreported_cache_creation),
       sum(unreported_reasoning)
FROM tally_usage_contributions('-infinity', 'infinity')
GROUP BY hour, model, provider, executor, labels;

-- Reports read the rollups; the per-(execution, model) view they read before is gone.
DROP VIEW usage_ledger;

"""The ledger's SQL statements, beside the code that runs them (``store/ledger.py``).

Batches travel as one JSON document read by ``json_to_recordset``: asyncpg type-checks every
element of an array parameter in Python, which cost more than the statements themselves.
"""

from __future__ import annotations

from orchestrator.store.totals import RECOMPUTE_JOB_TOTALS
from shared.usage import COLUMNS

# The executions a batch touches, locked in id order (as every writer of them locks them).
LOCK_EXECUTIONS = """
SELECT e.id, e.daemon_id, e.job_id, e.attempt, e.status,
       e.result_recorded_at IS NOT NULL AS done,
       j.executor, j.model, j.status AS job_status, j.cancel_requested,
       e.input_tokens, e.output_tokens, e.cache_read_input_tokens,
       e.cache_creation_input_tokens, e.reasoning_tokens, e.cost_usd,
       e.num_turns IS NOT NULL AS had_calls, j.labels::text AS labels
FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id = ANY(string_to_array($1, ',')::uuid[])
ORDER BY e.id
FOR UPDATE OF e
"""

# A batch's calls; idempotent on (execution, seq).
INSERT_CALLS = """
INSERT INTO llm_calls (execution_id, seq, provider, request_model, response_model,
    finish_reason, input_tokens, output_tokens, cache_read_input_tokens,
    cache_creation_input_tokens, reasoning_tokens, tokens_unavailable, cost_usd,
    cost_source, duration_ms, request_id, cache_creation_1h_input_tokens, started_at,
    recorded_at, usage_inconsistent)
SELECT execution_id, seq, provider, request_model, response_model, finish_reason,
    input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens,
    reasoning_tokens, tokens_unavailable, cost_usd, cost_source, duration_ms, request_id,
    cache_creation_1h_input_tokens, to_timestamp(started_at / 1000.0), $2::timestamptz,
    coalesce(usage_inconsistent, false)
FROM json_to_recordset($1::json) AS c(execution_id uuid, seq int,
    provider text, request_model text, response_model text, finish_reason text,
    input_tokens bigint, output_tokens bigint, cache_read_input_tokens bigint,
    cache_creation_input_tokens bigint, reasoning_tokens bigint,
    tokens_unavailable bool, cost_usd numeric, cost_source text,
    duration_ms float8, request_id text, cache_creation_1h_input_tokens bigint,
    started_at float8, usage_inconsistent bool)
ON CONFLICT (execution_id, seq) DO NOTHING
RETURNING execution_id, seq
"""

# Until its result arrives, an execution's totals are the sum of its recorded calls: the
# batch's new calls added (a bucket stays NULL while no call reported it).
ADD_RUNNING_TOTALS = f"""
UPDATE executions e SET {
    ", ".join(
        f"{col} = CASE WHEN d.{col} IS NULL THEN e.{col} ELSE coalesce(e.{col}, 0) + d.{col} END"
        for col in [*COLUMNS.values(), "cost_usd", "cache_creation_1h_input_tokens"]
    )
},
    num_turns = coalesce(e.num_turns, 0) + d.calls,
    unpriced_calls = e.unpriced_calls + d.unpriced,
    otlp_pending = true
FROM json_to_recordset($1::json)
     AS d(id uuid, input_tokens bigint, output_tokens bigint,
          cache_read_input_tokens bigint, cache_creation_input_tokens bigint,
          reasoning_tokens bigint, cost_usd numeric, calls int, unpriced int,
          cache_creation_1h_input_tokens bigint)
WHERE e.id = d.id AND e.result_recorded_at IS NULL
"""

# A call recorded after its execution's result leaves the result's totals as they are, but
# is exported: its attempt waits for the OTLP export again (migration 0012). Always written,
# even when already pending: the new row version is what stops an exporter that read the
# attempt before this call from marking it exported (queue.MARK compares xmin).
MARK_OTLP_PENDING = """
UPDATE executions SET otlp_pending = true
WHERE id = ANY(string_to_array($1, ',')::uuid[])
"""

# An execution's recorded calls, summed per model and provider (for the settlement of its
# result and its rollup increments).
CALLS_BY_MODEL = """
SELECT execution_id, coalesce(response_model, request_model) AS model, provider,
       sum(input_tokens) AS input, sum(output_tokens) AS output,
       sum(cache_read_input_tokens) AS cache_read,
       sum(cache_creation_input_tokens) AS cache_creation,
       sum(reasoning_tokens) AS reasoning, sum(cost_usd) AS cost,
       count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced,
       sum(cache_creation_1h_input_tokens) AS cache_1h
FROM llm_calls WHERE execution_id = ANY(string_to_array($1, ',')::uuid[])
GROUP BY 1, 2, 3
"""

# Jobs decided by the batch's results: status and totals in one statement. A retryable
# failure with attempts left re-queues its job instead, after an exponential backoff with
# jitter ($2 seconds doubled per attempt, times 0.5 to 1.5, at most 5 minutes), or the
# provider's retry-after when that is longer, honoured up to $3 seconds
# (shared.limits.MAX_RETRY_AFTER_MS, the bound the daemon applies too).
_AGAIN = (
    "(u.status = 'failed' AND u.retryable AND NOT j.cancel_requested"
    " AND j.attempts < j.max_attempts)"
)
DECIDE_JOBS = f"""
UPDATE jobs j SET
    status = CASE WHEN {_AGAIN} THEN 'queued' ELSE u.status END,
    finished_at = CASE WHEN {_AGAIN} THEN NULL ELSE now() END,
    available_at = CASE WHEN {_AGAIN} THEN now() + make_interval(secs => greatest(
        least(coalesce(u.retry_after_ms, 0) / 1000.0, $3::float8),
        least(300.0, $2::float8 * power(2, least(j.attempts - 1, 20)) * (0.5 + random()))))
        ELSE j.available_at END,
    error = u.error, stop_reason = u.stop_reason,
    input_tokens = s.input_tokens, output_tokens = s.output_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    reasoning_tokens = s.reasoning_tokens, cost_usd = s.cost_usd,
    num_turns = s.num_turns, unpriced_calls = s.unpriced_calls,
    cache_creation_1h_input_tokens = s.cache_creation_1h_input_tokens
FROM json_to_recordset($1::json)
     AS u(job_id uuid, status text, error text, stop_reason text, retryable bool,
          retry_after_ms float8)
CROSS JOIN LATERAL (
    SELECT sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens,
           sum(cache_read_input_tokens) AS cache_read_input_tokens,
           sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
           sum(reasoning_tokens) AS reasoning_tokens,
           sum(cost_usd) AS cost_usd, sum(num_turns) AS num_turns,
           sum(unpriced_calls) AS unpriced_calls,
           sum(cache_creation_1h_input_tokens)
               AS cache_creation_1h_input_tokens
    FROM executions e WHERE e.job_id = u.job_id
) s
WHERE j.id = u.job_id AND j.status = 'running'
RETURNING j.id, j.executor, j.status,
          extract(epoch FROM now() - j.created_at) AS age
"""

# A result's execution row and its per-model rows, from one JSON array of objects; then the
# batch's rollup increments, in one statement (so every writer locks rollup rows in one
# order): the calls' increments the writer summed ($3, orchestrator/rollups.py), and what
# each result adds by the rule of tally_usage_contributions() (migration 0009): its totals
# under the job's model; its per-model entries under their models, taken from the job's
# model; its calls (recorded up to it) taken from their models when it has entries, else
# from the job's model. Every row comes from one result's own row (no joins).
_RECORD_RESULTS = """
WITH u AS MATERIALIZED (
    SELECT * FROM json_to_recordset($1::json) AS u(
        id uuid, status text, error text, stop_reason text, duration_ms float8, num_turns int,
        input_tokens bigint, output_tokens bigint, cache_read bigint, cache_creation bigint,
        reasoning bigint, unavailable bool, cost numeric, cost_source text, model_usage jsonb,
        unpriced int, cache_1h bigint, job_model text, executor text, labels text,
        calls jsonb, calls_unpriced int, error_class text, output text, output_format text,
        output_truncated bool)
), m AS MATERIALIZED (
    SELECT u.id, u.executor, u.labels, u.job_model, u.input_tokens AS t0,
           u.output_tokens AS t1, u.cache_read AS t2, u.cache_creation AS t3,
           u.reasoning AS t4, u.cost AS tc, x.model, x.provider,
           CASE WHEN x.unreported ? 'inputTokens' THEN NULL ELSE x."inputTokens" END AS b0,
           CASE WHEN x.unreported ? 'outputTokens' THEN NULL ELSE x."outputTokens" END AS b1,
           CASE WHEN x.unreported ? 'cacheReadInputTokens' THEN NULL
                ELSE x."cacheReadInputTokens" END AS b2,
           CASE WHEN x.unreported ? 'cacheCreationInputTokens' THEN NULL
                ELSE x."cacheCreationInputTokens" END AS b3,
           CASE WHEN x.unreported ? 'reasoningTokens' THEN NULL
                ELSE x."reasoningTokens" END AS b4,
           CASE WHEN x.unreported ? 'costUsd' THEN NULL ELSE x."costUsd" END AS cost
    FROM u CROSS JOIN LATERAL jsonb_to_recordset(u.model_usage) AS x(
        model text, provider text, "inputTokens" bigint, "outputTokens" bigint,
        "cacheReadInputTokens" bigint, "cacheCreationInputTokens" bigint,
        "reasoningTokens" bigint, "costUsd" numeric, unreported jsonb)
), updated AS (
    UPDATE executions e SET status = u.status, error = u.error,
        stop_reason = u.stop_reason, duration_ms = u.duration_ms,
        num_turns = coalesce(u.num_turns, e.num_turns),
        input_tokens = u.input_tokens, output_tokens = u.output_tokens,
        cache_read_input_tokens = u.cache_read,
        cache_creation_input_tokens = u.cache_creation,
        reasoning_tokens = u.reasoning, tokens_unavailable = u.unavailable,
        unpriced_calls = u.unpriced, cache_creation_1h_input_tokens = u.cache_1h,
        cost_usd = u.cost, cost_source = u.cost_source, model_usage = u.model_usage,
        error_class = u.error_class, output = u.output, output_format = u.output_format,
        output_truncated = coalesce(u.output_truncated, false),
        result_recorded_at = $2::timestamptz, finished_at = coalesce(e.finished_at, now()),
        lease_expires_at = NULL, otlp_pending = true
    FROM u WHERE e.id = u.id
), per_model AS (
    INSERT INTO execution_model_usage (execution_id, model, provider, input_tokens,
        output_tokens, cache_read_input_tokens, cache_creation_input_tokens, reasoning_tokens,
        cost_usd)
    SELECT id, model, provider, b0, b1, b2, b3, b4, cost FROM m
), contributions AS (
    SELECT u.job_model AS model, u.executor AS provider, u.executor, u.labels,
           u.input_tokens AS b0, u.output_tokens AS b1, u.cache_read AS b2,
           u.cache_creation AS b3, u.reasoning AS b4, u.cost, 0::bigint AS calls,
           (u.calls IS NULL)::int::bigint AS executions,
           (u.unpriced - coalesce(u.calls_unpriced, 0))::bigint AS unpriced,
           0::bigint AS u0, 0::bigint AS u1, 0::bigint AS u2, 0::bigint AS u3, 0::bigint AS u4
    FROM u
    UNION ALL
    SELECT m.model, coalesce(m.provider, m.executor), m.executor, m.labels, m.b0, m.b1, m.b2,
           m.b3, m.b4, m.cost, 0, 0, 0, 0, 0, 0, 0, 0
    FROM m
    UNION ALL
    SELECT m.job_model, m.executor, m.executor, m.labels,
           CASE WHEN m.t0 IS NOT NULL THEN -m.b0 END, CASE WHEN m.t1 IS NOT NULL THEN -m.b1 END,
           CASE WHEN m.t2 IS NOT NULL THEN -m.b2 END, CASE WHEN m.t3 IS NOT NULL THEN -m.b3 END,
           CASE WHEN m.t4 IS NOT NULL THEN -m.b4 END,
           CASE WHEN m.tc IS NOT NULL THEN -m.cost END, 0, 0, 0, 0, 0, 0, 0, 0
    FROM m
    UNION ALL
    SELECT CASE WHEN x.entries THEN x.model ELSE x.job_model END,
           CASE WHEN x.entries THEN x.provider ELSE x.executor END, x.executor, x.labels,
           CASE WHEN x.entries OR x.t0 IS NOT NULL THEN -x.b0 END,
           CASE WHEN x.entries OR x.t1 IS NOT NULL THEN -x.b1 END,
           CASE WHEN x.entries OR x.t2 IS NOT NULL THEN -x.b2 END,
           CASE WHEN x.entries OR x.t3 IS NOT NULL THEN -x.b3 END,
           CASE WHEN x.entries OR x.t4 IS NOT NULL THEN -x.b4 END,
           CASE WHEN x.entries OR x.tc IS NOT NULL THEN -x.cost END, 0, 0, 0, 0, 0, 0, 0, 0
    FROM (
        SELECT u.executor, u.labels, u.job_model, u.input_tokens AS t0,
               u.output_tokens AS t1, u.cache_read AS t2, u.cache_creation AS t3,
               u.reasoning AS t4, u.cost AS tc,
               coalesce(jsonb_array_length(u.model_usage), 0) > 0 AS entries, c.*
        FROM u CROSS JOIN LATERAL jsonb_to_recordset(u.calls) AS c(
            model text, provider text, b0 bigint, b1 bigint, b2 bigint, b3 bigint,
            b4 bigint, cost numeric)
    ) x
    UNION ALL
    SELECT * FROM json_to_recordset($3::json) AS k(model text, provider text, executor text,
        labels text, b0 numeric, b1 numeric, b2 numeric, b3 numeric, b4 numeric, cost numeric,
        calls bigint, executions bigint, unpriced bigint, u0 bigint, u1 bigint, u2 bigint,
        u3 bigint, u4 bigint)
)
{upsert}
"""

# Jobs whose totals a batch changed without deciding them (calls of a running attempt, or
# late usage of a lost or rejected one after the job was decided) are re-summed; a finished
# job whose totals moved is announced like a status change ("<id> <status> -", at most 100
# lines per notification), so watching clients on every orchestrator get its new totals.
RESUM_AND_ANNOUNCE = f"""
WITH resummed AS (
    {RECOMPUTE_JOB_TOTALS.strip()}
    AND (j.input_tokens, j.output_tokens, j.cache_read_input_tokens,
         j.cache_creation_input_tokens, j.reasoning_tokens, j.cost_usd, j.num_turns,
         j.unpriced_calls, j.cache_creation_1h_input_tokens)
        IS DISTINCT FROM
        (s.input_tokens, s.output_tokens, s.cache_read_input_tokens,
         s.cache_creation_input_tokens, s.reasoning_tokens, s.cost_usd, s.num_turns,
         s.unpriced_calls, s.cache_creation_1h_input_tokens)
    RETURNING j.id, j.status
)
SELECT pg_notify('tally_jobs', string_agg(line, E'\\n'))
FROM (SELECT id::text || ' ' || status || ' -' AS line, (row_number() OVER () - 1) / 100 AS chunk
      FROM resummed WHERE status IN ('succeeded', 'failed', 'cancelled')) lines
GROUP BY chunk
"""


# The batch's rollup increments (orchestrator/rollups.py), added to the rows of the hour the
# batch is recorded at, in one order for every writer (no deadlock between them); sums stay
# NULL (unknown) until something reports them.
_ROLLUP_SUMS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)
_ROLLUP_COUNTS = (
    "calls",
    "executions",
    "unpriced_calls",
    "unreported_input",
    "unreported_output",
    "unreported_cache_read",
    "unreported_cache_creation",
    "unreported_reasoning",
)
# Every value column of a rollup row.
ROLLUP_VALUES = (*_ROLLUP_SUMS, "cost_usd", *_ROLLUP_COUNTS)

# A key's row gets the increment added; a sum stays NULL (unknown) while nothing reported it.
_ADD_ON_CONFLICT = (
    "ON CONFLICT (hour, executor, provider, model, labels_key, shard) DO UPDATE SET "
    + ", ".join(
        f"{c} = CASE WHEN EXCLUDED.{c} IS NULL THEN t.{c} "
        f"ELSE coalesce(t.{c}, 0) + EXCLUDED.{c} END"
        for c in (*_ROLLUP_SUMS, "cost_usd")
    )
    + ", "
    + ", ".join(f"{c} = t.{c} + EXCLUDED.{c}" for c in _ROLLUP_COUNTS)
)

_UPSERT = f"""
INSERT INTO usage_hourly AS t (hour, model, provider, executor, labels, shard,
    {", ".join(_ROLLUP_SUMS)}, cost_usd, {", ".join(_ROLLUP_COUNTS)})
SELECT date_trunc('hour', $2::timestamptz, 'UTC'), r.model, r.provider, r.executor,
       r.labels::jsonb, {{shard}}, sum(r.b0), sum(r.b1), sum(r.b2), sum(r.b3), sum(r.b4),
       sum(r.cost), sum(r.calls), sum(r.executions), sum(r.unpriced), sum(r.u0), sum(r.u1),
       sum(r.u2), sum(r.u3), sum(r.u4)
FROM {{source}} r
GROUP BY r.model, r.provider, r.executor, r.labels
ORDER BY r.model, r.provider, r.executor, r.labels
{_ADD_ON_CONFLICT}
"""

# A batch without results: only its calls' increments ($1); the writer's shard is $3.
UPSERT_ROLLUPS = _UPSERT.format(
    shard="$3::smallint",
    source="""(SELECT * FROM json_to_recordset($1::json) AS k(model text, provider text,
    executor text, labels text, b0 numeric, b1 numeric, b2 numeric, b3 numeric, b4 numeric,
    cost numeric, calls bigint, executions bigint, unpriced bigint, u0 bigint, u1 bigint,
    u2 bigint, u3 bigint, u4 bigint))""",
)

RECORD_RESULTS = _RECORD_RESULTS.format(
    upsert=_UPSERT.format(source="contributions", shard="$4::smallint")
)

# Past hours' shards folded into shard 0, in one statement (writers only add to the hour
# their clock is in, so this never waits for them). Run by every orchestrator's upkeep.
FOLD_ROLLUP_SHARDS = f"""
WITH moved AS (
    DELETE FROM usage_hourly
    WHERE shard <> 0 AND hour < date_trunc('hour', clock_timestamp(), 'UTC') - interval '1 hour'
    RETURNING *
)
INSERT INTO usage_hourly AS t (hour, model, provider, executor, labels, shard,
    {", ".join(ROLLUP_VALUES)})
SELECT hour, model, provider, executor, labels, 0,
       {", ".join(f"sum({c})" for c in ROLLUP_VALUES)}
FROM moved GROUP BY hour, model, provider, executor, labels
ORDER BY hour, model, provider, executor, labels
{_ADD_ON_CONFLICT}
"""

# A batch's new tool calls (job:tool), idempotent on (execution, seq); returns those inserted.
INSERT_TOOLS = """
INSERT INTO tool_calls (execution_id, seq, name, after_call, started_at, duration_ms,
    arguments_bytes, result_bytes, error, recorded_at)
SELECT t.execution_id, t.seq, t.name, t.after_call,
       to_timestamp(t.started_at / 1000.0), t.duration_ms, t.arguments_bytes, t.result_bytes,
       t.error, $2::timestamptz
FROM json_to_recordset($1::json) AS t(
    execution_id uuid, seq int, name text, after_call int, started_at float8,
    duration_ms float8, arguments_bytes bigint, result_bytes bigint, error bool)
ORDER BY t.execution_id, t.seq
ON CONFLICT (execution_id, seq) DO NOTHING
RETURNING execution_id, seq
"""

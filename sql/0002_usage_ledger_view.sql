-- One row per (execution, model) with the tokens and cost the ledger attributes to it:
-- the per-model rows of a result when it sent them, else the execution's recorded calls
-- grouped by model, else the execution's totals under the job's model. Reports read this.
CREATE VIEW usage_ledger AS
SELECT e.id AS execution_id, e.job_id, e.status AS execution_status,
       coalesce(e.finished_at, e.offered_at) AS at,
       m.model, coalesce(m.provider, j.executor) AS provider, j.executor, j.labels,
       m.input_tokens, m.output_tokens, m.cache_read_input_tokens,
       m.cache_creation_input_tokens, m.reasoning_tokens, m.cost_usd,
       (SELECT count(*) FROM llm_calls c WHERE c.execution_id = e.id
          AND coalesce(c.response_model, c.request_model) = m.model) AS calls
FROM executions e
JOIN jobs j ON j.id = e.job_id
JOIN execution_model_usage m ON m.execution_id = e.id
UNION ALL
SELECT e.id, e.job_id, e.status, coalesce(e.finished_at, e.offered_at),
       coalesce(c.response_model, c.request_model, j.model, j.executor), c.provider, j.executor,
       j.labels, sum(c.input_tokens), sum(c.output_tokens), sum(c.cache_read_input_tokens),
       sum(c.cache_creation_input_tokens), sum(c.reasoning_tokens), sum(c.cost_usd), count(*)
FROM executions e
JOIN jobs j ON j.id = e.job_id
JOIN llm_calls c ON c.execution_id = e.id
WHERE NOT EXISTS (SELECT 1 FROM execution_model_usage m WHERE m.execution_id = e.id)
GROUP BY e.id, e.job_id, e.status, 4, 5, c.provider, j.executor, j.labels
UNION ALL
SELECT e.id, e.job_id, e.status, coalesce(e.finished_at, e.offered_at),
       coalesce(j.model, j.executor), j.executor, j.executor, j.labels,
       e.input_tokens, e.output_tokens, e.cache_read_input_tokens,
       e.cache_creation_input_tokens, e.reasoning_tokens, e.cost_usd, 0
FROM executions e
JOIN jobs j ON j.id = e.job_id
WHERE NOT EXISTS (SELECT 1 FROM execution_model_usage m WHERE m.execution_id = e.id)
  AND NOT EXISTS (SELECT 1 FROM llm_calls c WHERE c.execution_id = e.id)
  AND (e.input_tokens IS NOT NULL OR e.output_tokens IS NOT NULL OR e.cost_usd IS NOT NULL);

"""A job's totals: always the sum of its executions' (recomputed, never incremented)."""

RECOMPUTE_JOB_TOTALS = """
UPDATE jobs j SET
    input_tokens = s.input_tokens,
    output_tokens = s.output_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    reasoning_tokens = s.reasoning_tokens,
    cost_usd = s.cost_usd,
    num_turns = s.num_turns,
    unpriced_calls = s.unpriced_calls,
    cache_creation_1h_input_tokens = s.cache_creation_1h_input_tokens
FROM (
    SELECT job_id,
           sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens,
           sum(cache_read_input_tokens) AS cache_read_input_tokens,
           sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
           sum(reasoning_tokens) AS reasoning_tokens,
           sum(cost_usd) AS cost_usd,
           sum(num_turns) AS num_turns,
           sum(unpriced_calls) AS unpriced_calls,
           sum(cache_creation_1h_input_tokens) AS cache_creation_1h_input_tokens
    FROM executions WHERE job_id = ANY($1::uuid[]) GROUP BY job_id
) s
WHERE j.id = s.job_id
"""

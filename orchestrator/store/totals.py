"""A job's totals: always the sum of its executions' (recomputed, never incremented)."""

from __future__ import annotations

from shared.usage import COLUMNS

# Every column a job sums from its executions: the buckets, cost, turns, unpriced calls and
# the 1-hour cache-write sub-bucket.
SUMMED = (
    *COLUMNS.values(),
    "cost_usd",
    "num_turns",
    "unpriced_calls",
    "cache_creation_1h_input_tokens",
)

RECOMPUTE_JOB_TOTALS = (
    "UPDATE jobs j SET "
    + ", ".join(f"{c} = s.{c}" for c in SUMMED)
    + " FROM (SELECT job_id, "
    + ", ".join(f"sum({c}) AS {c}" for c in SUMMED)
    + " FROM executions WHERE job_id = ANY($1::uuid[]) GROUP BY job_id) s"
    + " WHERE j.id = s.job_id"
)

"""SQL that seeds assigned executions for benchmarks and load tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg


async def seed_running_executions(
    conn: asyncpg.Connection, daemon_ids: Sequence[str], per_daemon: int
) -> dict[str, list[str]]:
    """Create running jobs and executions assigned to each daemon; return execution ids."""
    await conn.execute(
        """
        INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status)
        SELECT d, 'bench', 'bench', 1000000, 'disconnected' FROM unnest($1::text[]) AS d
        ON CONFLICT (id) DO NOTHING
        """,
        list(daemon_ids),
    )
    out: dict[str, list[str]] = {}
    for daemon_id in daemon_ids:
        job_ids = [str(uuid.uuid4()) for _ in range(per_daemon)]
        exec_ids = [str(uuid.uuid4()) for _ in range(per_daemon)]
        await conn.execute(
            """
            INSERT INTO jobs (id, executor, model, status, attempts, started_at)
            SELECT j, 'simulated', 'sim-small', 'running', 1, now() FROM unnest($1::uuid[]) AS j
            """,
            job_ids,
        )
        await conn.execute(
            """
            INSERT INTO executions (id, job_id, attempt, daemon_id, status, lease_expires_at,
                                    started_at)
            SELECT e, j, 1, $3, 'running', now() + interval '1 day', now()
            FROM unnest($1::uuid[], $2::uuid[]) AS u(e, j)
            """,
            exec_ids,
            job_ids,
            daemon_id,
        )
        out[daemon_id] = exec_ids
    return out


# One finished job of N calls (a tool call after each but the last), recorded an hour ago,
# its execution's and job's totals the sums of its calls.
LONG_JOB = """
INSERT INTO jobs (id, executor, model, labels, status, attempts, created_at, started_at,
                  finished_at, num_turns)
VALUES ($1, 'simulated', 'sim-small', '{"team": "long"}', 'succeeded', 1,
        now() - interval '70 minutes', now() - interval '65 minutes',
        now() - interval '55 minutes', $2)
"""

LONG_JOB_EXECUTION = """
INSERT INTO executions (id, job_id, attempt, daemon_id, status, offered_at, started_at,
                        finished_at, result_recorded_at, num_turns, cost_source, duration_ms)
VALUES ($1, $2, 1, 'bench-long-job', 'succeeded', now() - interval '65 minutes',
        now() - interval '65 minutes', now() - interval '55 minutes',
        now() - interval '55 minutes', $3, 'price_table', 600000)
"""

LONG_JOB_CALLS = """
INSERT INTO llm_calls (execution_id, seq, provider, request_model, response_model,
    finish_reason, input_tokens, output_tokens, cache_read_input_tokens,
    cache_creation_input_tokens, reasoning_tokens, cost_usd, cost_source, duration_ms,
    recorded_at)
SELECT $1, s, 'simulated', 'sim-small', 'sim-small',
       CASE WHEN s = $2 - 1 THEN 'end_turn' ELSE 'tool_use' END,
       100 + s % 50, 20 + s % 7, 1000, 0, 0, (100 + s % 50) * 0.00000025, 'price_table', 50,
       now() - interval '60 minutes'
FROM generate_series(0, $2 - 1) AS s;
"""

LONG_JOB_TOOLS = """
INSERT INTO tool_calls (execution_id, seq, name, after_call, started_at, duration_ms,
                        arguments_bytes, result_bytes, recorded_at)
SELECT $1, s, 'lookup', s, now() - interval '60 minutes', 5, 40, 400,
       now() - interval '60 minutes'
FROM generate_series(0, $2 - 2) AS s
"""

LONG_JOB_TOTALS = """
WITH s AS (
    SELECT sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cache_read_input_tokens) AS r,
           sum(cache_creation_input_tokens) AS w, sum(reasoning_tokens) AS x,
           sum(cost_usd) AS c
    FROM llm_calls WHERE execution_id = $1
), e AS (
    UPDATE executions SET input_tokens = s.i, output_tokens = s.o,
        cache_read_input_tokens = s.r, cache_creation_input_tokens = s.w,
        reasoning_tokens = s.x, cost_usd = s.c
    FROM s WHERE id = $1
)
UPDATE jobs SET input_tokens = s.i, output_tokens = s.o, cache_read_input_tokens = s.r,
    cache_creation_input_tokens = s.w, reasoning_tokens = s.x, cost_usd = s.c
FROM s WHERE id = $2
"""


async def seed_long_job(conn: asyncpg.Connection, calls: int) -> str:
    """A finished job with ``calls`` calls and a tool call after each but the last; returns
    its id. Its rollups are not written: seed it before the rollups are built (as
    ``orchestrator.bench.report.seed`` builds them from every call)."""
    job_id, execution_id = str(uuid.uuid4()), str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status)"
        " VALUES ('bench-long-job', 'bench', 'bench', 1, 'disconnected')"
        " ON CONFLICT (id) DO NOTHING"
    )
    await conn.execute(LONG_JOB, job_id, calls)
    await conn.execute(LONG_JOB_EXECUTION, execution_id, job_id, calls)
    await conn.execute(LONG_JOB_CALLS, execution_id, calls)
    await conn.execute(LONG_JOB_TOOLS, execution_id, calls)
    await conn.execute(LONG_JOB_TOTALS, execution_id, job_id)
    return job_id

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

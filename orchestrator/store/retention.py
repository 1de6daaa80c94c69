"""Retention: detail rows removed in bounded batches while rollups and job totals remain; and
the rollups' own upkeep (past hours' shards folded into one row per key).

Each batch is its own short transaction (no long locks: ingestion goes on between them).
Only detail that can no longer change is removed:

- ``prune_calls``: calls recorded before the cut whose execution's result was also recorded
  before it. An execution still waiting for its result (or reaped without one) keeps its
  calls, because a late result is settled against them.
- ``prune_jobs``: every execution (with its calls and per-model rows) of a job that finished
  before the cut and whose every attempt ended, and last recorded anything, before it. The
  job keeps its totals and says when its detail went (``detail_pruned_at``).

The cut is rounded down to a UTC hour, and recorded in ``ledger_retention`` so that
``tally ledger check`` starts there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from orchestrator.store.ledger_sql import FOLD_ROLLUP_SHARDS


def _delete_settled(table: str) -> str:
    """Delete up to $2 rows of ``table`` (calls or tool calls) recorded before $1 whose
    execution's result was recorded before $1 too: detail that can no longer change."""
    return f"""
WITH victims AS (
    SELECT d.execution_id, d.seq
    FROM {table} d JOIN executions e ON e.id = d.execution_id
    WHERE d.recorded_at < $1 AND e.result_recorded_at < $1
    LIMIT $2
)
DELETE FROM {table} d USING victims v
WHERE d.execution_id = v.execution_id AND d.seq = v.seq
"""


DELETE_CALLS = _delete_settled("llm_calls")
# Tool calls go with the calls: settled detail of the same age.
DELETE_TOOLS = _delete_settled("tool_calls")

PRUNABLE_JOBS = """
SELECT j.id FROM jobs j
WHERE j.status IN ('succeeded', 'failed', 'cancelled') AND j.finished_at < $1
  AND j.detail_pruned_at IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM executions e
      WHERE e.job_id = j.id
        AND (e.status IN ('offered', 'running')
             OR coalesce(e.result_recorded_at, e.finished_at, e.offered_at) >= $1
             OR EXISTS (SELECT 1 FROM llm_calls c
                        WHERE c.execution_id = e.id AND c.recorded_at >= $1)))
"""

DELETE_JOB_DETAIL = """
WITH gone AS (
    DELETE FROM executions e WHERE e.job_id = ANY($1::uuid[]) RETURNING e.job_id
)
UPDATE jobs SET detail_pruned_at = now() WHERE id = ANY($1::uuid[])
"""


@dataclass(slots=True)
class Pruned:
    """What one prune removed."""

    cut: datetime
    calls: int = 0
    tools: int = 0
    jobs: int = 0
    batches: int = 0


async def hour_of(conn: asyncpg.Connection, at: datetime) -> datetime:
    """``at`` rounded down to its UTC hour."""
    value: datetime = await conn.fetchval("SELECT date_trunc('hour', $1::timestamptz, 'UTC')", at)
    return value


async def prune_calls(
    conn: asyncpg.Connection,
    before: datetime,
    batch: int = 5000,
    progress: Callable[[Pruned], None] | None = None,
) -> Pruned:
    """Delete settled calls recorded before the hour of ``before``, ``batch`` per transaction."""
    cut = await hour_of(conn, before)
    done = Pruned(cut)
    await conn.execute("UPDATE ledger_retention SET calls_before = greatest(calls_before, $1)", cut)
    for statement in (DELETE_CALLS, DELETE_TOOLS):
        while True:
            status = await conn.execute(statement, cut, batch)
            n = int(status.split()[-1])
            if statement is DELETE_CALLS:
                done.calls += n
            else:
                done.tools += n
            done.batches += 1
            if progress is not None:
                progress(done)
            if n < batch:
                break
    return done


async def prune_jobs(
    conn: asyncpg.Connection,
    before: datetime,
    batch: int = 500,
    progress: Callable[[Pruned], None] | None = None,
) -> Pruned:
    """Delete the executions, calls and per-model rows of jobs finished before the hour of
    ``before`` (see the module's docstring), ``batch`` jobs per transaction."""
    cut = await hour_of(conn, before)
    done = Pruned(cut)
    await conn.execute(
        "UPDATE ledger_retention SET executions_before = greatest(executions_before, $1)", cut
    )
    # One walk of the jobs' primary key, a batch at a time (memory stays bounded): each batch
    # is found, locked and deleted in one short transaction, so a late frame that landed
    # since is seen by the locked re-check.
    after = "00000000-0000-0000-0000-000000000000"
    while True:
        async with conn.transaction():
            locked = await conn.fetch(
                PRUNABLE_JOBS
                + " AND j.id > $2::uuid ORDER BY j.id LIMIT $3 FOR UPDATE OF j SKIP LOCKED",
                cut,
                after,
                batch,
            )
            if locked:
                await conn.execute(DELETE_JOB_DETAIL, [r["id"] for r in locked])
        done.batches += 1
        done.jobs += len(locked)
        if progress is not None:
            progress(done)
        if len(locked) < batch:
            return done
        after = str(locked[-1]["id"])


async def fold_rollup_shards(pool: asyncpg.Pool) -> int:
    """Fold the writers' rollup shards of past hours into one row per key; the rows moved."""
    status = await pool.execute(FOLD_ROLLUP_SHARDS)
    return int(status.split()[-1])

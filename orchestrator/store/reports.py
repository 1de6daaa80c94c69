"""SQL of the reports: usage by any grouping, recent jobs, one job in detail."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.errors import ConfigError

GROUPS = {
    "model": "model",
    "provider": "provider",
    "executor": "executor",
    "day": "to_char(date_trunc('day', at), 'YYYY-MM-DD')",
}


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of the usage report."""

    key: str
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    reasoning_tokens: int
    cost_usd: float
    calls: int
    executions: int

    @property
    def total_input(self) -> int:
        """input + cache read + cache creation."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    @property
    def cache_hit_ratio(self) -> float | None:
        """cache read / total input, None when there was no input."""
        total = self.total_input
        return None if total == 0 else self.cache_read_input_tokens / total


def group_expression(group_by: str) -> tuple[str, list[Any]]:
    """SQL for a grouping: model, provider, executor, day, or label:KEY."""
    if group_by in GROUPS:
        return GROUPS[group_by], []
    if group_by.startswith("label:") and len(group_by) > 6:
        return "coalesce(labels ->> $2, '(none)')", [group_by[6:]]
    raise ConfigError(f"--by {group_by!r}: expected model, provider, executor, day or label:KEY")


async def usage(conn: asyncpg.Connection, group_by: str, since: datetime) -> list[UsageRow]:
    """Tokens by bucket, cost, calls and executions per group since a time."""
    expr, extra = group_expression(group_by)
    rows = await conn.fetch(
        f"""
        SELECT {expr} AS key,
               coalesce(sum(input_tokens), 0) AS input_tokens,
               coalesce(sum(output_tokens), 0) AS output_tokens,
               coalesce(sum(cache_read_input_tokens), 0) AS cache_read_input_tokens,
               coalesce(sum(cache_creation_input_tokens), 0) AS cache_creation_input_tokens,
               coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd,
               coalesce(sum(calls), 0) AS calls,
               count(DISTINCT execution_id) AS executions
        FROM usage_ledger WHERE at >= $1
        GROUP BY 1 ORDER BY 7 DESC, 1
        """,
        since,
        *extra,
    )
    return [
        UsageRow(
            key=str(r["key"]),
            input_tokens=int(r["input_tokens"]),
            output_tokens=int(r["output_tokens"]),
            cache_read_input_tokens=int(r["cache_read_input_tokens"]),
            cache_creation_input_tokens=int(r["cache_creation_input_tokens"]),
            reasoning_tokens=int(r["reasoning_tokens"]),
            cost_usd=float(r["cost_usd"]),
            calls=int(r["calls"]),
            executions=int(r["executions"]),
        )
        for r in rows
    ]


async def recent_jobs(
    conn: asyncpg.Connection,
    status: str | None,
    executor: str | None,
    labels: dict[str, str],
    limit: int,
) -> list[asyncpg.Record]:
    """The most recent jobs matching the filters."""
    return list(
        await conn.fetch(
            """
            SELECT id, status, executor, model, attempts, created_at, finished_at,
                   input_tokens, output_tokens, cache_read_input_tokens,
                   cache_creation_input_tokens, cost_usd, stop_reason, error, labels
            FROM jobs
            WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR executor = $2)
              AND labels @> $3::jsonb
            ORDER BY created_at DESC LIMIT $4
            """,
            status,
            executor,
            json.dumps(labels),
            limit,
        )
    )


async def job_detail(
    conn: asyncpg.Connection, job_id: str
) -> tuple[asyncpg.Record | None, list[asyncpg.Record], list[asyncpg.Record]]:
    """A job, its executions and its calls."""
    job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1::uuid", job_id)
    executions = await conn.fetch(
        "SELECT * FROM executions WHERE job_id = $1::uuid ORDER BY offered_at", job_id
    )
    calls = await conn.fetch(
        """
        SELECT c.* FROM llm_calls c JOIN executions e ON e.id = c.execution_id
        WHERE e.job_id = $1::uuid ORDER BY e.offered_at, c.seq
        """,
        job_id,
    )
    return job, list(executions), list(calls)

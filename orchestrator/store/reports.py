"""SQL of the reports: usage by any grouping, recent jobs, one job in detail."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from shared.errors import ConfigError
from shared.usage import COLUMNS

GROUPS = {
    "model": "model",
    "provider": "provider",
    "executor": "executor",
    "day": "to_char(date_trunc('day', at), 'YYYY-MM-DD')",
}


BUCKET_COLUMNS = tuple(COLUMNS.values())


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of the usage report; None is unknown (nothing reported), never 0.

    ``unreported`` counts, per bucket column, the calls of the group that did not report
    it; ``unpriced_calls`` the calls without a cost, which make ``cost_usd`` a lower bound.
    """

    key: str
    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None
    reasoning_tokens: int | None
    cost_usd: float | None
    calls: int
    executions: int
    unreported: dict[str, int] = field(default_factory=dict)
    unpriced_calls: int = 0

    @property
    def total_input(self) -> int | None:
        """input + cache read + cache creation (the known parts), None when none is known."""
        parts = (self.input_tokens, self.cache_read_input_tokens, self.cache_creation_input_tokens)
        if all(v is None for v in parts):
            return None
        return sum(v or 0 for v in parts)

    @property
    def cache_hit_ratio(self) -> float | None:
        """cache read / total input, None when there was no (known) input."""
        total = self.total_input
        return None if not total else (self.cache_read_input_tokens or 0) / total


def group_expression(group_by: str) -> tuple[str, list[Any]]:
    """SQL for a grouping: model, provider, executor, day, or label:KEY."""
    if group_by in GROUPS:
        return GROUPS[group_by], []
    if group_by.startswith("label:") and len(group_by) > 6:
        return "coalesce(labels ->> $2, '(none)')", [group_by[6:]]
    raise ConfigError(f"--by {group_by!r}: expected model, provider, executor, day or label:KEY")


# The calls of the ledger with the columns the groupings read, for the per-group counts of
# calls that did not report a bucket or a cost.
CALLS_LEDGER = """
SELECT coalesce(c.response_model, c.request_model, j.model, j.executor) AS model,
       c.provider, j.executor, j.labels, coalesce(e.finished_at, e.offered_at) AS at,
       c.input_tokens, c.output_tokens, c.cache_read_input_tokens,
       c.cache_creation_input_tokens, c.reasoning_tokens, c.cost_usd
FROM llm_calls c JOIN executions e ON e.id = c.execution_id JOIN jobs j ON j.id = e.job_id
"""


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


async def usage(conn: asyncpg.Connection, group_by: str, since: datetime) -> list[UsageRow]:
    """Tokens by bucket, cost, calls and executions per group since a time.

    A bucket no row of the group reported is None (unknown), not 0; so is a cost no row
    priced. Each group also says how many of its calls did not report each bucket and how
    many had no price.
    """
    expr, extra = group_expression(group_by)
    rows = await conn.fetch(
        f"""
        SELECT {expr} AS key,
               {", ".join(f"sum({c}) AS {c}" for c in BUCKET_COLUMNS)},
               sum(cost_usd) AS cost_usd,
               coalesce(sum(calls), 0) AS calls,
               count(DISTINCT execution_id) AS executions
        FROM usage_ledger WHERE at >= $1
        GROUP BY 1 ORDER BY 7 DESC NULLS LAST, 1
        """,
        since,
        *extra,
    )
    counts = await conn.fetch(
        f"""
        SELECT {expr} AS key,
               {", ".join(f"count(*) FILTER (WHERE {c} IS NULL) AS {c}" for c in BUCKET_COLUMNS)},
               count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced
        FROM ({CALLS_LEDGER}) calls WHERE at >= $1
        GROUP BY 1
        """,
        since,
        *extra,
    )
    by_key = {str(r["key"]): r for r in counts}
    out = []
    for r in rows:
        key = str(r["key"])
        c = by_key.get(key)
        unreported = {col: int(c[col]) for col in BUCKET_COLUMNS if c[col]} if c else {}
        out.append(
            UsageRow(
                key=key,
                **{c: _optional_int(r[c]) for c in BUCKET_COLUMNS},
                cost_usd=None if r["cost_usd"] is None else float(r["cost_usd"]),
                calls=int(r["calls"]),
                executions=int(r["executions"]),
                unreported=unreported,
                unpriced_calls=int(c["unpriced"]) if c else 0,
            )
        )
    return out


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
                   cache_creation_input_tokens, cost_usd, stop_reason, error, labels,
                   unpriced_calls
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


async def resolve_job_id(conn: asyncpg.Connection, prefix: str) -> str:
    """The one job whose id starts with ``prefix`` (as `git` resolves a short hash)."""
    clean = prefix.lower()
    hyphens = (8, 13, 18, 23)
    if (
        not clean
        or len(clean) > 36
        or any(
            (c != "-") if i in hyphens else (c not in "0123456789abcdef")
            for i, c in enumerate(clean)
        )
    ):
        raise ConfigError(f"JOB_ID {prefix!r}: expected a job id or the start of one (hex)")
    if len(clean) == 36:
        return clean
    if len(clean) < 4:
        raise ConfigError(f"JOB_ID {prefix!r}: give at least 4 characters of the id")
    # The primary key's btree serves the range; no cast of every id to text.
    low = (clean + "00000000-0000-0000-0000-000000000000"[len(clean) :])[:36]
    high = (clean + "ffffffff-ffff-ffff-ffff-ffffffffffff"[len(clean) :])[:36]
    rows = await conn.fetch(
        "SELECT id::text FROM jobs WHERE id BETWEEN $1::uuid AND $2::uuid LIMIT 2", low, high
    )
    if not rows:
        raise ConfigError(f"no job {prefix}")
    if len(rows) > 1:
        raise ConfigError(f"JOB_ID {prefix!r} is ambiguous: several jobs start with it")
    return str(rows[0]["id"])


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

"""The export queue in the ledger: decided attempts whose spans have not reached the endpoint.

``executions.otlp_pending`` is set by every write that changes what an attempt would export
(its result, a call, a call recorded after its result) and cleared by :func:`mark_exported`
only if the row did not change since it was read (its ``xmin``), so a late result or call is
exported again rather than lost, and is counted in the metrics by exactly one exporter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from shared.usage import Usage

# The export's queue, the predicate of its partial index (migration 0016): decided attempts,
# and rejected offers. A rejected offer is exported only when its daemon ran it anyway and
# reported calls or a result (late usage, spent all the same); one that never ran is marked
# without being sent (``Attempt.ran``). The index names no column that recording a call
# changes (a predicate on num_turns would make every call's row update an index update).
EXPORTABLE = "otlp_pending AND status IN ('succeeded', 'failed', 'lost', 'cancelled', 'rejected')"

PENDING = f"""
SELECT e.*, j.executor, j.model, j.labels
FROM (
    SELECT id, xmin::text AS version, job_id, attempt, status, daemon_id, offered_at,
           started_at, finished_at, otlp_exported_at, error, stop_reason, num_turns,
           input_tokens, output_tokens, cache_read_input_tokens,
           cache_creation_input_tokens, reasoning_tokens, cost_usd, cost_source,
           status <> 'rejected' OR result_recorded_at IS NOT NULL OR num_turns IS NOT NULL
               AS ran
    FROM executions
    WHERE {EXPORTABLE}
    ORDER BY finished_at
    LIMIT $1
) e JOIN jobs j ON j.id = e.job_id
ORDER BY e.finished_at
"""

CALLS = """
SELECT execution_id, seq, provider, request_model, response_model, finish_reason,
       request_id, input_tokens, output_tokens, cache_read_input_tokens,
       cache_creation_input_tokens, reasoning_tokens, cost_usd, cost_source, duration_ms,
       started_at, recorded_at
FROM llm_calls WHERE execution_id = ANY($1::uuid[])
ORDER BY execution_id, seq
"""

# Cleared only where the row is as it was read: a result or call recorded meanwhile keeps it
# pending (the update changed xmin). The export time is the database's clock, the clock of
# llm_calls.recorded_at, so a later export can tell the calls recorded since.
MARK = """
UPDATE executions e SET otlp_pending = false, otlp_exported_at = clock_timestamp()
FROM unnest($1::uuid[], $2::text[]) AS d(id, version)
WHERE e.id = d.id AND e.xmin::text = d.version
RETURNING e.id
"""

# Attempts decided before the backlog horizon are not exported (counted as skipped).
SKIP_OLD = f"""
WITH old AS (
    SELECT id FROM executions
    WHERE {EXPORTABLE} AND finished_at < $1
    LIMIT 10000
)
UPDATE executions e SET otlp_pending = false FROM old WHERE e.id = old.id
"""

BACKLOG = f"SELECT count(*) FROM executions WHERE {EXPORTABLE}"


def usage_of(row: Any) -> Usage:
    """The five buckets of a ledger row (NULL stays unknown)."""
    return Usage(
        input=row["input_tokens"],
        output=row["output_tokens"],
        cache_read=row["cache_read_input_tokens"],
        cache_creation=row["cache_creation_input_tokens"],
        reasoning=row["reasoning_tokens"],
    )


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded LLM call, as the ledger holds it."""

    seq: int
    provider: str
    request_model: str | None
    response_model: str | None
    finish_reason: str | None
    request_id: str | None
    usage: Usage
    cost_usd: Decimal | None
    cost_source: str | None
    duration_ms: float | None
    started_at: datetime | None
    recorded_at: datetime


@dataclass(slots=True)
class Attempt:
    """One decided execution and its calls, as the ledger holds them."""

    id: str
    version: str
    job_id: str
    attempt: int
    status: str
    daemon_id: str
    executor: str
    model: str | None
    labels: dict[str, str]
    offered_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    exported_at: datetime | None
    error: str | None
    stop_reason: str | None
    num_turns: int | None
    usage: Usage
    cost_usd: Decimal | None
    cost_source: str | None
    calls: list[Call] = field(default_factory=list)
    # False for a rejected offer that never ran (no call, no result): nothing to export.
    ran: bool = True


def _attempt(row: Any) -> Attempt:
    return Attempt(
        id=str(row["id"]),
        version=row["version"],
        job_id=str(row["job_id"]),
        attempt=row["attempt"],
        status=row["status"],
        daemon_id=row["daemon_id"],
        executor=row["executor"],
        model=row["model"],
        labels=json.loads(row["labels"]) if row["labels"] else {},
        offered_at=row["offered_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exported_at=row["otlp_exported_at"],
        error=row["error"],
        stop_reason=row["stop_reason"],
        num_turns=row["num_turns"],
        usage=usage_of(row),
        cost_usd=row["cost_usd"],
        cost_source=row["cost_source"],
        ran=row["ran"],
    )


def _call(row: Any) -> Call:
    return Call(
        seq=row["seq"],
        provider=row["provider"],
        request_model=row["request_model"],
        response_model=row["response_model"],
        finish_reason=row["finish_reason"],
        request_id=row["request_id"],
        usage=usage_of(row),
        cost_usd=row["cost_usd"],
        cost_source=row["cost_source"],
        duration_ms=row["duration_ms"],
        started_at=row["started_at"],
        recorded_at=row["recorded_at"],
    )


async def pending(conn: asyncpg.Connection, limit: int) -> list[Attempt]:
    """Up to ``limit`` decided attempts waiting for export, oldest first, with their calls."""
    attempts = [_attempt(row) for row in await conn.fetch(PENDING, limit)]
    if attempts:
        by_id = {a.id: a for a in attempts}
        for row in await conn.fetch(CALLS, list(by_id)):
            by_id[str(row["execution_id"])].calls.append(_call(row))
    return attempts


async def mark_exported(conn: asyncpg.Connection, attempts: list[Attempt]) -> list[Attempt]:
    """Clear the attempts that did not change since they were read; return those."""
    rows = await conn.fetch(MARK, [a.id for a in attempts], [a.version for a in attempts])
    marked = {str(row["id"]) for row in rows}
    return [a for a in attempts if a.id in marked]


async def skip_older(conn: asyncpg.Connection, cutoff: datetime) -> int:
    """Stop waiting on attempts decided before ``cutoff``; return how many were skipped."""
    skipped = 0
    while True:
        status = await conn.execute(SKIP_OLD, cutoff)
        done = int(status.split()[-1])
        skipped += done
        if done < 10000:
            return skipped


async def backlog(conn: asyncpg.Connection) -> int:
    """Decided attempts still waiting for export."""
    return int(await conn.fetchval(BACKLOG))

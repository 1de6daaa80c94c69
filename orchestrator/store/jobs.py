"""SQL of the job lifecycle: submission, claiming, offers, leases, reaping, cancellation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from orchestrator.store import budgets
from orchestrator.store.claim import Claim as Claim  # re-exported
from orchestrator.store.claim import ClaimedJob as ClaimedJob  # re-exported
from orchestrator.store.claim import ClaimRows
from orchestrator.store.daemons import DaemonRows
from orchestrator.store.db import json_text
from orchestrator.store.leases import LeaseRows, Requeued
from orchestrator.store.spend import ClosedSpend
from shared import protocol as p

_TOTAL_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
    "cache_creation_1h_input_tokens",
)


@dataclass(frozen=True, slots=True)
class JobView:
    """A job's status and, when finished, its totals."""

    job_id: str
    status: str
    attempts: int
    totals: dict[str, Any] = field(default_factory=dict)
    # What the deciding attempt answered: text, or the JSON object; None when nothing.
    output: str | dict[str, Any] | None = None
    output_truncated: bool = False


# A queued job is cancelled at once; a running one is flagged, and every orchestrator hears it
# (the job's notification) and the one holding its daemon relays job:cancel; its usage so far
# stays recorded. Returns the job's status, or no row when it had already finished.
CANCEL_JOB = """
UPDATE jobs SET cancel_requested = true,
    status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
    finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END
WHERE id = $1 AND status IN ('queued', 'running')
RETURNING status
"""


def stored_output(text: str | None, form: str | None) -> str | dict[str, Any] | None:
    """An attempt's stored answer as it was sent: text, or the JSON object."""
    if text is None or form != "json":
        return text
    value = msgspec.json.decode(text)
    return value if isinstance(value, dict) else text


class JobStore(ClaimRows, DaemonRows, LeaseRows):
    """Job lifecycle statements, run on a shared pool (daemons and leases in their modules)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        requeue_backoff: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        hold_recheck: float = 5.0,
    ) -> None:
        # The budgets' clock (a test moves it across a period boundary), and how soon a job
        # held by a budget is looked at again (sooner at its period's reset).
        self.clock = clock
        self.hold_recheck = hold_recheck
        # Budget spend in closed hours, summed once per process (store/spend.py).
        self.closed_spend = ClosedSpend()
        self.pool = pool
        self.requeue_backoff = requeue_backoff

    # --- submission ----------------------------------------------------------------------

    async def submit(self, jobs: Sequence[p.JobSpec]) -> list[str]:
        """Insert jobs; a repeated idempotency key returns the existing job's id."""
        ids = [str(uuid.uuid4()) for _ in jobs]
        keys = [j.idempotency_key if isinstance(j.idempotency_key, str) else None for j in jobs]
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetch(
                """
                INSERT INTO jobs (id, queue, executor, model, spec, limits, labels,
                                  max_attempts, priority, idempotency_key, available_at)
                SELECT u.id, u.queue, u.executor, u.model, u.spec, u.limits, u.labels,
                       u.max_attempts, u.priority, u.key,
                       now() + make_interval(secs => coalesce(u.delay_ms, 0) / 1000.0)
                FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                            $5::jsonb[], $6::jsonb[], $7::jsonb[], $8::int[],
                            $9::int[], $10::text[], $11::float8[])
                     AS u(id, queue, executor, model, spec, limits, labels, max_attempts,
                          priority, key, delay_ms)
                ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING id
                """,
                ids,
                [j.queue for j in jobs],
                [j.executor for j in jobs],
                [j.model if isinstance(j.model, str) else None for j in jobs],
                [json_text(j.spec) for j in jobs],
                [json_text(j.limits) for j in jobs],
                [json_text(j.labels) for j in jobs],
                [j.max_attempts for j in jobs],
                [j.priority for j in jobs],
                keys,
                [float(j.delay_ms) if isinstance(j.delay_ms, int | float) else None for j in jobs],
            )
            created = {str(r["id"]) for r in inserted}
            missing = [k for i, k in zip(ids, keys, strict=True) if i not in created and k]
            existing: dict[str, str] = {}
            if missing:
                rows = await conn.fetch(
                    "SELECT idempotency_key, id FROM jobs WHERE idempotency_key = ANY($1::text[])",
                    missing,
                )
                existing = {r["idempotency_key"]: str(r["id"]) for r in rows}
        out: list[str] = []
        seen_keys: dict[str, str] = {}
        for job_id, key in zip(ids, keys, strict=True):
            if job_id in created:
                out.append(job_id)
                if key:
                    seen_keys[key] = job_id
            else:
                assert key is not None
                out.append(existing.get(key) or seen_keys[key])
        return out

    # --- dispatch ------------------------------------------------------------------------

    async def accept(self, execution_id: str, daemon_id: str, lease_timeout: float) -> bool | None:
        """An offered execution becomes running with a lease; None if not ours or not
        offered, else whether a client asked to cancel its job (read by the same statement:
        the accept needs no second round trip to learn it)."""
        cancel_requested: bool | None = await self.pool.fetchval(
            """
            UPDATE executions e SET status = 'running', started_at = now(),
                lease_expires_at = now() + make_interval(secs => $3), counted_until = NULL
            FROM jobs j
            WHERE e.id = $1 AND e.daemon_id = $2 AND e.status = 'offered' AND j.id = e.job_id
            RETURNING j.cancel_requested
            """,
            execution_id,
            daemon_id,
            lease_timeout,
        )
        return cancel_requested

    async def fail_offer(self, execution_id: str, error: str) -> bool:
        """An offer that cannot be sent ends its job as failed (stopReason error); False if
        the execution was no longer an open offer."""
        async with self.pool.acquire() as conn, conn.transaction():
            job_id = await conn.fetchval(
                """
                UPDATE executions SET status = 'rejected', finished_at = now(),
                    lease_expires_at = NULL, error = $2
                WHERE id = $1 AND status = 'offered'
                RETURNING job_id
                """,
                execution_id,
                error,
            )
            if job_id is None:
                return False
            status = await conn.execute(
                "UPDATE jobs SET status = 'failed', stop_reason = 'error', error = $2, "
                "finished_at = now() WHERE id = $1 AND status = 'running'",
                job_id,
                error,
            )
        return bool(status != "UPDATE 0")

    async def reject(
        self, execution_id: str, daemon_id: str, reason: str, message: str | None
    ) -> Requeued | None:
        """A rejected offer returns its job to the queue; ``busy`` does not burn the attempt."""
        busy = reason in ("busy", "shutting-down")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                UPDATE executions SET status = 'rejected', finished_at = now(),
                    lease_expires_at = NULL, error = $3
                WHERE id = $1 AND daemon_id = $2 AND status = 'offered'
                RETURNING job_id
                """,
                execution_id,
                daemon_id,
                f"rejected: {reason}" + (f": {message}" if message else ""),
            )
            if row is None:
                return None
            job = await conn.fetchrow(
                """
                UPDATE jobs SET
                    attempts = attempts - CASE WHEN $2 THEN 1 ELSE 0 END,
                    status = CASE WHEN cancel_requested THEN 'cancelled'
                                  WHEN $2 OR attempts < max_attempts THEN 'queued'
                                  ELSE 'failed' END,
                    error = CASE WHEN $2 THEN error ELSE $3 END,
                    finished_at = CASE WHEN NOT $2 AND attempts >= max_attempts
                                       THEN now() ELSE finished_at END
                WHERE id = $1 AND status = 'running'
                RETURNING status, executor
                """,
                row["job_id"],
                busy,
                f"rejected by daemon {daemon_id}: {reason}",
            )
        if job is None:
            return None
        return Requeued(execution_id, str(row["job_id"]), job["status"], job["executor"], False)

    # --- clients -------------------------------------------------------------------------

    async def request_cancel(self, job_id: str) -> str | None:
        """Cancel a queued job now, or flag a running one; return the job's status or None."""
        row = await self.pool.fetchrow(CANCEL_JOB, job_id)
        return None if row is None else str(row["status"])

    async def views(self, job_ids: Sequence[str]) -> list[JobView]:
        """Status, attempts and (for finished jobs) totals of jobs."""
        rows = await self.pool.fetch(
            """
            SELECT j.id, j.status, j.attempts, j.input_tokens, j.output_tokens,
                   j.cache_read_input_tokens, j.cache_creation_input_tokens, j.reasoning_tokens,
                   j.cost_usd, j.num_turns, j.stop_reason, j.error, j.unpriced_calls,
                   j.cache_creation_1h_input_tokens, o.output, o.output_format,
                   o.output_truncated
            FROM jobs j
            LEFT JOIN LATERAL (
                SELECT e.output, e.output_format, e.output_truncated FROM executions e
                WHERE e.job_id = j.id AND j.status IN ('succeeded', 'failed', 'cancelled')
                  AND e.result_recorded_at IS NOT NULL AND e.status NOT IN ('lost', 'rejected')
                ORDER BY e.attempt DESC LIMIT 1
            ) o ON true
            WHERE j.id = ANY($1::uuid[])
            """,
            list(job_ids),
        )
        views = []
        for r in rows:
            totals: dict[str, Any] = {}
            if r["status"] in p.TERMINAL_JOB_STATES:
                for column in _TOTAL_COLUMNS:
                    if r[column] is not None:
                        totals[column] = int(r[column])
                if r["cost_usd"] is not None:
                    totals["cost_usd"] = float(r["cost_usd"])
                if r["num_turns"] is not None:
                    totals["num_turns"] = int(r["num_turns"])
                if r["unpriced_calls"]:
                    totals["unpriced_calls"] = int(r["unpriced_calls"])
                if r["stop_reason"]:
                    totals["stop_reason"] = r["stop_reason"]
                if r["error"]:
                    totals["error_message"] = r["error"]
            views.append(
                JobView(
                    str(r["id"]),
                    r["status"],
                    r["attempts"],
                    totals,
                    stored_output(r["output"], r["output_format"]),
                    bool(r["output_truncated"]),
                )
            )
        return views

    async def budget_report(self) -> list[budgets.Standing]:
        """Every budget's standing now; reservations of decided attempts removed first. The
        closed hours are not summed here (the warm-up does): a budget whose sum is not
        ready is reported ``loading``."""
        async with self.pool.acquire() as conn:
            await conn.execute(budgets.DROP_SETTLED)
            return await budgets.report(conn, self.clock(), self.closed_spend, advance=False)

    async def warm_closed_spend(self) -> int:
        """Sum the closed hours of every budget's current period (and of the keys claims
        asked for), with no deadline: the claims and the snapshot never do. Jobs held while
        their budget's figures were loading are released. Returns how many keys were cold."""
        async with self.pool.acquire() as conn:
            now = self.clock()
            keys = [
                (json.dumps(b.selector, sort_keys=True), b.window(now)[0])
                for b in await budgets.load(conn)
                if b.problem is None
            ]
            warmed = await self.closed_spend.advance(conn, [*keys, *self.closed_spend.requested])
            if warmed:
                await budgets.release_loading(conn)
        return warmed

    async def queued_by_queue(self) -> dict[str, int]:
        """Queued job counts per queue (for the gauge snapshot)."""
        rows = await self.pool.fetch(
            "SELECT queue, count(*) AS n FROM jobs WHERE status = 'queued' GROUP BY queue"
        )
        return {r["queue"]: int(r["n"]) for r in rows}

"""SQL of leases: re-attaching a reconnected daemon's executions, renewing, expiring them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from orchestrator.store.budgets import LOST_RESERVATION_HOLD
from orchestrator.store.totals import RECOMPUTE_JOB_TOTALS


@dataclass(frozen=True, slots=True)
class Requeued:
    """A job whose execution ended without a result (lost, expired offer or rejected)."""

    execution_id: str
    job_id: str
    job_status: str
    executor: str
    lost: bool


class LeaseRows:
    """Statements on leases; mixed into :class:`orchestrator.store.jobs.JobStore`."""

    pool: asyncpg.Pool
    requeue_backoff: float

    async def reattach(
        self, daemon_id: str, execution_ids: Sequence[str], lease_timeout: float
    ) -> list[tuple[str, str]]:
        """Re-attach a reconnecting daemon's live executions; return ``(execution, job)`` ids."""
        if not execution_ids:
            return []
        rows = await self.pool.fetch(
            """
            WITH mine AS (  -- locked in id order, as the ledger writer locks them
                SELECT id FROM executions
                WHERE id = ANY($1::uuid[]) AND daemon_id = $2 AND status IN ('offered', 'running')
                ORDER BY id
                FOR UPDATE
            )
            UPDATE executions e SET status = 'running',
                started_at = coalesce(e.started_at, now()), lease_renewed_at = now(),
                lease_expires_at = now() + make_interval(secs => $3)
            FROM mine WHERE e.id = mine.id
            RETURNING e.id, e.job_id
            """,
            list(execution_ids),
            daemon_id,
            lease_timeout,
        )
        return [(str(r["id"]), str(r["job_id"])) for r in rows]

    async def extend_leases(self, execution_ids: Sequence[str], lease_timeout: float) -> None:
        """Push the leases of running executions held by live daemons."""
        if execution_ids:
            # Rows a ledger batch holds are skipped, not waited for: that batch is recording
            # their results, and waiting while holding other rows of the same daemon could
            # deadlock with it (it locks in id order; a plain UPDATE locks in any order).
            await self.pool.execute(
                """
                WITH live AS (
                    SELECT id FROM executions
                    WHERE id = ANY($1::uuid[]) AND status = 'running'
                    ORDER BY id
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE executions e SET lease_expires_at = now() + make_interval(secs => $2),
                    lease_renewed_at = now()
                FROM live WHERE e.id = live.id
                """,
                list(execution_ids),
                lease_timeout,
            )

    async def reap(self) -> list[Requeued]:
        """Expire offers and leases: lost executions re-queue their job with backoff.

        An attempt ended here without its result (lost, or an offer that timed out: the
        daemon starts a job as it sends job:accept, which a link reset can lose) keeps
        counting until its result is recorded (its daemon, cut off, may still be spending),
        at most ``LOST_RESERVATION_HOLD`` seconds (``counted_until``): its budget
        reservations stand, and its job's limits count it as what it was offered. A lost
        attempt's run time ends at its last sign of life (``lease_renewed_at``)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                WITH expired AS (
                    SELECT id, status FROM executions
                    WHERE status IN ('offered', 'running') AND lease_expires_at < now()
                    ORDER BY id
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE executions e SET
                    status = CASE WHEN x.status = 'offered' THEN 'rejected' ELSE 'lost' END,
                    error = CASE WHEN x.status = 'offered' THEN 'offer timed out'
                                 ELSE 'lease expired' END,
                    finished_at = now(), lease_expires_at = NULL,
                    counted_until = now() + make_interval(secs => $1)
                FROM expired x WHERE e.id = x.id
                RETURNING e.id, e.job_id, x.status AS old_status
                """,
                LOST_RESERVATION_HOLD,
            )
            if not rows:
                return []
            job_ids = list({str(r["job_id"]) for r in rows})
            jobs = await conn.fetch(
                """
                UPDATE jobs SET
                    status = CASE WHEN cancel_requested THEN 'cancelled'
                                  WHEN attempts < max_attempts THEN 'queued'
                                  ELSE 'failed' END,
                    available_at = now() + make_interval(
                        secs => $2 * power(2, least(greatest(attempts - 1, 0), 8))),
                    error = 'execution lost (lease expired) on attempt ' || attempts,
                    finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts
                                       THEN now() ELSE NULL END
                WHERE id = ANY($1::uuid[]) AND status = 'running'
                RETURNING id, status, executor
                """,
                job_ids,
                self.requeue_backoff,
            )
            await conn.execute(RECOMPUTE_JOB_TOTALS, job_ids)
        by_job = {str(j["id"]): j for j in jobs}
        out: list[Requeued] = []
        for r in rows:
            job = by_job.get(str(r["job_id"]))
            out.append(
                Requeued(
                    str(r["id"]),
                    str(r["job_id"]),
                    job["status"] if job else "unchanged",
                    job["executor"] if job else "",
                    r["old_status"] == "running",
                )
            )
        return out

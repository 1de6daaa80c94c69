"""SQL of leases: re-attaching a reconnected daemon's executions, renewing, expiring them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from orchestrator.store.budgets import LOST_RESERVATION_HOLD
from orchestrator.store.totals import RECOMPUTE_JOB_TOTALS

# An execution its daemon does not list when it registers counts at most this long more:
# time for the daemon's outbox to deliver a result it still holds.
NOT_LISTED_GRACE = 5.0

# Jobs whose attempt ended without its result go back to the queue with backoff (or end:
# cancelled, or failed at their last attempt).
REQUEUE_ENDED = """
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
"""


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
        """Re-attach a reconnecting daemon's live executions; return ``(execution, job)`` ids.

        The daemon's executions it does not list are not running on it: see
        :meth:`_not_listed`."""
        await self._not_listed(daemon_id, execution_ids)
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
            UPDATE executions e SET status = 'running', counted_until = NULL,
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

    async def _not_listed(self, daemon_id: str, execution_ids: Sequence[str]) -> None:
        """A registering daemon runs none of its executions it does not list: they count
        (reservations, offered limits) at most ``NOT_LISTED_GRACE`` seconds more, time for
        its outbox to deliver a result it holds, instead of ``LOST_RESERVATION_HOLD``. Those
        still offered or running are left to their result or their deadline (the reaper
        keeps this shorter ``counted_until``)."""
        await self.pool.execute(
            """
            WITH candidates AS (
                -- Read through indexed paths only, never a scan of every execution: the
                -- live ones (partial index), those holding a budget reservation, and
                -- those of queued jobs (partial index; their limits count them).
                SELECT id FROM executions
                WHERE daemon_id = $1 AND status IN ('offered', 'running')
                UNION
                SELECT r.execution_id FROM budget_reservations r
                UNION
                SELECT x.id FROM jobs j JOIN executions x ON x.job_id = j.id
                WHERE j.status = 'queued' AND j.attempts > 0
            ), gone AS (  -- locked in id order, as the ledger writer locks them
                SELECT e.id FROM executions e JOIN candidates c ON c.id = e.id
                WHERE e.daemon_id = $1 AND e.id <> ALL($2::uuid[])
                  AND e.result_recorded_at IS NULL
                  AND (e.status IN ('offered', 'running') OR e.counted_until > now())
                ORDER BY e.id
                FOR UPDATE OF e SKIP LOCKED
            )
            UPDATE executions e SET counted_until = least(
                coalesce(e.counted_until, 'infinity'), now() + make_interval(secs => $3))
            FROM gone g WHERE e.id = g.id
            """,
            daemon_id,
            list(execution_ids),
            NOT_LISTED_GRACE,
        )

    async def withdraw(self, execution_ids: Sequence[str], error: str) -> list[str]:
        """Offers never delivered (no session, the send failed or timed out) end now: their
        jobs are queued again without losing the attempt, and nothing of them is counted
        (a late delivery is answered not_assigned). Returns the ids withdrawn."""
        if not execution_ids:
            return []
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                WITH mine AS (
                    SELECT id FROM executions
                    WHERE id = ANY($1::uuid[]) AND status = 'offered'
                    ORDER BY id
                    FOR UPDATE
                )
                UPDATE executions e SET status = 'rejected', error = $2, finished_at = now(),
                    lease_expires_at = NULL, counted_until = NULL
                FROM mine WHERE e.id = mine.id
                RETURNING e.id, e.job_id
                """,
                list(execution_ids),
                error,
            )
            if rows:
                await conn.execute(
                    """
                    UPDATE jobs SET attempts = attempts - 1,
                        status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
                        finished_at = CASE WHEN cancel_requested THEN now() ELSE NULL END
                    WHERE id = ANY($1::uuid[]) AND status = 'running'
                    """,
                    list({str(r["job_id"]) for r in rows}),
                )
        return [str(r["id"]) for r in rows]

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
                    -- set already: its daemon registered without it (released sooner)
                    counted_until = coalesce(e.counted_until, now() + make_interval(secs => $1))
                FROM expired x WHERE e.id = x.id
                RETURNING e.id, e.job_id, x.status AS old_status
                """,
                LOST_RESERVATION_HOLD,
            )
            if not rows:
                return []
            job_ids = list({str(r["job_id"]) for r in rows})
            jobs = await conn.fetch(REQUEUE_ENDED, job_ids, self.requeue_backoff)
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

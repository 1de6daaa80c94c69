"""SQL of the job lifecycle: submission, claiming, offers, leases, reaping, cancellation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from shared import protocol as p

_TERMINAL = ("succeeded", "failed", "cancelled")
_TOTAL_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
    "cache_creation_1h_input_tokens",
)

RECOMPUTE_JOB_TOTALS = """
UPDATE jobs j SET
    input_tokens = s.input_tokens,
    output_tokens = s.output_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    reasoning_tokens = s.reasoning_tokens,
    cost_usd = s.cost_usd,
    num_turns = s.num_turns,
    unpriced_calls = s.unpriced_calls,
    cache_creation_1h_input_tokens = s.cache_creation_1h_input_tokens
FROM (
    SELECT job_id,
           sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens,
           sum(cache_read_input_tokens) AS cache_read_input_tokens,
           sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
           sum(reasoning_tokens) AS reasoning_tokens,
           sum(cost_usd) AS cost_usd,
           sum(num_turns) AS num_turns,
           sum(unpriced_calls) AS unpriced_calls,
           sum(cache_creation_1h_input_tokens) AS cache_creation_1h_input_tokens
    FROM executions WHERE job_id = ANY($1::uuid[]) GROUP BY job_id
) s
WHERE j.id = s.job_id
"""


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job claimed for one daemon, with the execution created for it."""

    execution_id: str
    job_id: str
    attempt: int
    daemon_id: str
    executor: str
    model: str | None
    spec: dict[str, Any]
    limits: dict[str, Any]
    labels: dict[str, str]
    queue_wait_seconds: float


@dataclass(frozen=True, slots=True)
class JobView:
    """A job's status and, when finished, its totals."""

    job_id: str
    status: str
    attempts: int
    totals: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Requeued:
    """A job whose execution ended without a result (lost, expired offer or rejected)."""

    execution_id: str
    job_id: str
    job_status: str
    executor: str
    lost: bool


def _jsonb(value: Any) -> str:
    return msgspec.json.encode(value).decode()


class JobStore:
    """Job lifecycle statements, run on a shared pool."""

    def __init__(self, pool: asyncpg.Pool, requeue_backoff: float = 1.0) -> None:
        self.pool = pool
        self.requeue_backoff = requeue_backoff

    # --- daemons -------------------------------------------------------------------------

    async def upsert_daemon(
        self,
        reg: p.RegisterPayload,
        orchestrator_id: str,
        token_fingerprint: str | None = None,
        stale_after: float = 15.0,
    ) -> bool:
        """Record a daemon's identity and mark it connected to this orchestrator.

        Returns False, changing nothing, when a live connection that presented another token
        holds the id (connected, and seen within ``stale_after`` seconds): one daemon token
        cannot take over another daemon's id.
        """
        row = await self.pool.fetchval(
            """
            INSERT INTO daemons (id, hostname, version, executors, max_concurrent_jobs, labels,
                                 status, orchestrator_id, token_fingerprint)
            VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, 'connected', $7, $8)
            ON CONFLICT (id) DO UPDATE SET hostname = EXCLUDED.hostname,
                version = EXCLUDED.version, executors = EXCLUDED.executors,
                max_concurrent_jobs = EXCLUDED.max_concurrent_jobs, labels = EXCLUDED.labels,
                status = 'connected', orchestrator_id = EXCLUDED.orchestrator_id,
                token_fingerprint = EXCLUDED.token_fingerprint, last_seen_at = now()
            WHERE daemons.status = 'disconnected'
               OR daemons.token_fingerprint IS NOT DISTINCT FROM EXCLUDED.token_fingerprint
               OR daemons.last_seen_at < now() - make_interval(secs => $9)
            RETURNING id
            """,
            reg.daemon_id,
            reg.hostname,
            reg.version,
            _jsonb(reg.executors),
            reg.max_concurrent_jobs,
            _jsonb(reg.labels),
            orchestrator_id,
            token_fingerprint,
            stale_after,
        )
        return row is not None

    async def set_daemon_status(self, daemon_id: str, status: str, orchestrator_id: str) -> None:
        """Update a daemon's status, unless another orchestrator now holds it."""
        await self.pool.execute(
            "UPDATE daemons SET status = $2, last_seen_at = now() "
            "WHERE id = $1 AND orchestrator_id = $3",
            daemon_id,
            status,
            orchestrator_id,
        )

    async def touch_daemons(self, daemon_ids: Sequence[str]) -> None:
        """Refresh last_seen_at of live daemons."""
        if daemon_ids:
            await self.pool.execute(
                "UPDATE daemons SET last_seen_at = now() WHERE id = ANY($1::text[])",
                list(daemon_ids),
            )

    # --- submission ----------------------------------------------------------------------

    async def submit(self, jobs: Sequence[p.JobSpec]) -> list[str]:
        """Insert jobs; a repeated idempotency key returns the existing job's id."""
        ids = [str(uuid.uuid4()) for _ in jobs]
        keys = [j.idempotency_key if isinstance(j.idempotency_key, str) else None for j in jobs]
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetch(
                """
                INSERT INTO jobs (id, queue, executor, model, spec, limits, labels,
                                  max_attempts, priority, idempotency_key)
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                                     $5::jsonb[], $6::jsonb[], $7::jsonb[], $8::int[],
                                     $9::int[], $10::text[])
                ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING id
                """,
                ids,
                [j.queue for j in jobs],
                [j.executor for j in jobs],
                [j.model if isinstance(j.model, str) else None for j in jobs],
                [_jsonb(j.spec) for j in jobs],
                [_jsonb(j.limits) for j in jobs],
                [_jsonb(j.labels) for j in jobs],
                [j.max_attempts for j in jobs],
                [j.priority for j in jobs],
                keys,
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

    async def claim(
        self,
        slots: dict[str, list[tuple[str, dict[str, frozenset[str]]]]],
        offer_timeout: float,
        limit: int,
    ) -> list[ClaimedJob]:
        """Claim queued jobs for free daemon slots (SKIP LOCKED) and create their executions.

        ``slots`` maps executor name to a list of ``(daemon_id, executors)`` entries, one per
        free slot, least loaded daemon first; a daemon's executor entry lists the models it is
        restricted to (empty: any model).
        """
        executors = list(slots)
        if not executors or limit <= 0:
            return []
        claimed: list[ClaimedJob] = []
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                SELECT id, executor, model, spec, limits, labels, attempts,
                       extract(epoch FROM now() - available_at) AS waited
                FROM jobs
                WHERE status = 'queued' AND available_at <= now() AND NOT cancel_requested
                  AND executor = ANY($1::text[])
                ORDER BY priority DESC, available_at, created_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
                """,
                executors,
                limit,
            )
            for row in rows:
                free = slots.get(row["executor"], [])
                pick = next(
                    (
                        i
                        for i, (_, offers) in enumerate(free)
                        if not offers[row["executor"]] or row["model"] in offers[row["executor"]]
                    ),
                    None,
                )
                if pick is None:
                    continue
                daemon_id, _ = free.pop(pick)
                # The same daemon has other free slots further down the list; keep the
                # list least-loaded-first by taking the slot and leaving the others.
                claimed.append(
                    ClaimedJob(
                        execution_id=str(uuid.uuid4()),
                        job_id=str(row["id"]),
                        attempt=row["attempts"] + 1,
                        daemon_id=daemon_id,
                        executor=row["executor"],
                        model=row["model"],
                        spec=json.loads(row["spec"]),
                        limits=json.loads(row["limits"]),
                        labels=json.loads(row["labels"]),
                        queue_wait_seconds=max(0.0, float(row["waited"])),
                    )
                )
            if claimed:
                await conn.execute(
                    """
                    INSERT INTO executions (id, job_id, attempt, daemon_id, status,
                                            lease_expires_at)
                    SELECT u.id, u.job_id, u.attempt, u.daemon_id, 'offered',
                           now() + make_interval(secs => $5)
                    FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[])
                         AS u(id, job_id, attempt, daemon_id)
                    """,
                    [c.execution_id for c in claimed],
                    [c.job_id for c in claimed],
                    [c.attempt for c in claimed],
                    [c.daemon_id for c in claimed],
                    offer_timeout,
                )
                await conn.execute(
                    "UPDATE jobs SET status = 'running', attempts = attempts + 1, "
                    "started_at = coalesce(started_at, now()) WHERE id = ANY($1::uuid[])",
                    [c.job_id for c in claimed],
                )
        return claimed

    async def next_available_in(self) -> float | None:
        """Seconds until the earliest backed-off queued job becomes available, or None."""
        value = await self.pool.fetchval(
            "SELECT extract(epoch FROM min(available_at) - now()) FROM jobs "
            "WHERE status = 'queued' AND available_at > now()"
        )
        return None if value is None else max(0.0, float(value))

    async def accept(self, execution_id: str, daemon_id: str, lease_timeout: float) -> bool:
        """An offered execution becomes running with a lease; False if not ours or not offered."""
        row = await self.pool.fetchval(
            """
            UPDATE executions SET status = 'running', started_at = now(),
                lease_expires_at = now() + make_interval(secs => $3)
            WHERE id = $1 AND daemon_id = $2 AND status = 'offered'
            RETURNING id
            """,
            execution_id,
            daemon_id,
            lease_timeout,
        )
        return row is not None

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
                started_at = coalesce(e.started_at, now()),
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
                UPDATE executions e SET lease_expires_at = now() + make_interval(secs => $2)
                FROM live WHERE e.id = live.id
                """,
                list(execution_ids),
                lease_timeout,
            )

    async def reap(self) -> list[Requeued]:
        """Expire offers and leases: lost executions re-queue their job with backoff."""
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
                    finished_at = now(), lease_expires_at = NULL
                FROM expired x WHERE e.id = x.id
                RETURNING e.id, e.job_id, x.status AS old_status
                """
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

    # --- clients -------------------------------------------------------------------------

    async def request_cancel(self, job_id: str) -> str | None:
        """Cancel a queued job now, or flag a running one; return the job's status or None."""
        row = await self.pool.fetchrow(
            """
            UPDATE jobs SET cancel_requested = true,
                status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
                finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END
            WHERE id = $1 AND status IN ('queued', 'running')
            RETURNING status
            """,
            job_id,
        )
        return None if row is None else str(row["status"])

    async def views(self, job_ids: Sequence[str]) -> list[JobView]:
        """Status, attempts and (for finished jobs) totals of jobs."""
        rows = await self.pool.fetch(
            """
            SELECT id, status, attempts, input_tokens, output_tokens, cache_read_input_tokens,
                   cache_creation_input_tokens, reasoning_tokens, cost_usd, num_turns,
                   stop_reason, error, unpriced_calls, cache_creation_1h_input_tokens
            FROM jobs WHERE id = ANY($1::uuid[])
            """,
            list(job_ids),
        )
        views = []
        for r in rows:
            totals: dict[str, Any] = {}
            if r["status"] in _TERMINAL:
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
            views.append(JobView(str(r["id"]), r["status"], r["attempts"], totals))
        return views

    async def queued_by_queue(self) -> dict[str, int]:
        """Queued job counts per queue (for the gauge snapshot)."""
        rows = await self.pool.fetch(
            "SELECT queue, count(*) AS n FROM jobs WHERE status = 'queued' GROUP BY queue"
        )
        return {r["queue"]: int(r["n"]) for r in rows}

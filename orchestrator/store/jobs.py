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
from orchestrator.store.budgets import Admission, Refusal
from orchestrator.store.daemons import DaemonRows
from orchestrator.store.leases import LeaseRows, Requeued
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


def _jsonb(value: Any) -> str:
    return msgspec.json.encode(value).decode()


class JobStore(DaemonRows, LeaseRows):
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
        # Executors of the jobs a budget failed at dispatch, for the jobs counter.
        self.budget_failed: list[str] = []
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
                [_jsonb(j.spec) for j in jobs],
                [_jsonb(j.limits) for j in jobs],
                [_jsonb(j.labels) for j in jobs],
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
        # A daemon with several executors is listed once per free slot under each of them;
        # each daemon's free slots are counted once, so a slot taken under one executor is
        # not offered again under another.
        free_slots: dict[str, int] = {}
        for entries in slots.values():
            counts: dict[str, int] = {}
            for daemon_id, _ in entries:
                counts[daemon_id] = counts.get(daemon_id, 0) + 1
            for daemon_id, n in counts.items():
                free_slots[daemon_id] = max(free_slots.get(daemon_id, 0), n)
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
            admission = await Admission.open(conn, rows, self.clock()) if rows else None
            held: list[tuple[str, str, datetime | None]] = []
            failed: list[tuple[str, str]] = []
            for row in rows:
                free = slots.get(row["executor"], [])
                pick = next(
                    (
                        i
                        for i, (daemon, offers) in enumerate(free)
                        if free_slots[daemon] > 0
                        and (not offers[row["executor"]] or row["model"] in offers[row["executor"]])
                    ),
                    None,
                )
                if pick is None:
                    continue
                execution_id = str(uuid.uuid4())
                limits = json.loads(row["limits"])
                spec = json.loads(row["spec"])
                if admission is not None:
                    verdict = admission.admit(execution_id, json.loads(row["labels"]), limits, spec)
                    if isinstance(verdict, Refusal):
                        if verdict.action == "hold":
                            held.append((str(row["id"]), verdict.reason, verdict.retry_at))
                        else:
                            failed.append((str(row["id"]), verdict.reason))
                            self.budget_failed.append(row["executor"])
                        continue
                    limits = verdict
                daemon_id, _ = free.pop(pick)
                free_slots[daemon_id] -= 1
                # The same daemon has other free slots further down the list; keep the
                # list least-loaded-first by taking the slot and leaving the others.
                claimed.append(
                    ClaimedJob(
                        execution_id=execution_id,
                        job_id=str(row["id"]),
                        attempt=row["attempts"] + 1,
                        daemon_id=daemon_id,
                        executor=row["executor"],
                        model=row["model"],
                        spec=spec,
                        limits=limits,
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
                    "started_at = coalesce(started_at, now()), hold_reason = NULL "
                    "WHERE id = ANY($1::uuid[])",
                    [c.job_id for c in claimed],
                )
            if admission is not None:
                await admission.record(conn)
            if held:
                await conn.execute(
                    budgets.HOLD_JOBS, *map(list, zip(*held, strict=True)), self.hold_recheck
                )
            if failed:
                await conn.execute(budgets.FAIL_JOBS, *map(list, zip(*failed, strict=True)))
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
        """Every budget's standing now; reservations of decided attempts removed first."""
        async with self.pool.acquire() as conn:
            await conn.execute(budgets.DROP_SETTLED)
            return await budgets.report(conn, self.clock())

    async def queued_by_queue(self) -> dict[str, int]:
        """Queued job counts per queue (for the gauge snapshot)."""
        rows = await self.pool.fetch(
            "SELECT queue, count(*) AS n FROM jobs WHERE status = 'queued' GROUP BY queue"
        )
        return {r["queue"]: int(r["n"]) for r in rows}

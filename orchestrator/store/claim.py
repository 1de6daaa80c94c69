"""SQL of the claim: queued jobs matched to free daemon slots, under their limits and budgets.

A claim looks past the jobs it cannot offer now (held or refused by a budget, no free slot
for their executor or model), so they never starve the jobs behind them. A retried job is
offered what its earlier attempts left of its limits (``store/job_limits.py``); a job with
nothing left, or refused by a budget with action fail, is failed in the same transaction,
and the claim returns the executors of what it failed so that they are counted once, after
the commit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from orchestrator.store import budgets
from orchestrator.store.admission import Admission, Refusal
from orchestrator.store.job_limits import (
    Exhausted,
    LimitError,
    Used,
    exhausted_error,
    offer_limits,
)
from orchestrator.store.spend import ClosedSpend


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
class Claim:
    """What one claim did, once its transaction committed: the jobs claimed, the executors
    of the jobs it failed (budget action fail, limits used up), and whether it stopped at
    :data:`MAX_EXAMINED` candidates with more to look at."""

    jobs: list[ClaimedJob]
    failed: list[str]
    more: bool

    def __iter__(self) -> Iterator[ClaimedJob]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


# A claim looks at most this many queued jobs (held, refused or without a slot) before it
# returns and asks to be called again.
MAX_EXAMINED = 1000

# The claim's candidates, best first; the jobs it already looked at are skipped.
CANDIDATES = """
SELECT id, executor, model, spec, limits, labels, attempts,
       extract(epoch FROM now() - available_at) AS waited
FROM jobs
WHERE status = 'queued' AND available_at <= now() AND NOT cancel_requested
  AND executor = ANY($1::text[]) AND id <> ALL($3::uuid[])
ORDER BY priority DESC, available_at, created_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

# What the earlier attempts of retried jobs spent: a job's limits bound the job.
USED_BY_EARLIER_ATTEMPTS = """
SELECT job_id, coalesce(sum(cost_usd), 0) AS cost, coalesce(sum(num_turns), 0) AS turns,
       coalesce(sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)
                    + coalesce(cache_read_input_tokens, 0)
                    + coalesce(cache_creation_input_tokens, 0)), 0) AS tokens,
       coalesce(sum(output_tokens), 0) AS output,
       coalesce(sum(coalesce(duration_ms::float8,
                             extract(epoch FROM finished_at - started_at)::float8 * 1000)),
                0) AS run_ms
FROM executions WHERE job_id = ANY($1::uuid[]) GROUP BY job_id
"""


class ClaimRows:
    """The claim's statements; mixed into :class:`orchestrator.store.jobs.JobStore`."""

    pool: asyncpg.Pool
    clock: Callable[[], datetime]
    hold_recheck: float
    closed_spend: ClosedSpend

    async def claim(
        self,
        slots: dict[str, list[tuple[str, dict[str, frozenset[str]]]]],
        offer_timeout: float,
        limit: int,
        default_max_turns: int | None = None,
    ) -> Claim:
        """Claim queued jobs for free daemon slots (SKIP LOCKED) and create their executions.

        ``slots`` maps executor name to a list of ``(daemon_id, executors)`` entries, one per
        free slot, least loaded daemon first; a daemon's executor entry lists the models it is
        restricted to (empty: any model). Jobs a budget holds or refuses, and jobs no free slot
        can take, do not use up the claim: it looks further down the queue (at most
        :data:`MAX_EXAMINED` jobs, then ``more`` says to claim again). Returns the jobs
        claimed and the executors of the jobs it failed, once its transaction committed.
        """
        if not slots or limit <= 0:
            return Claim([], [], False)
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
        held: list[tuple[str, str, datetime | None]] = []
        failed: list[tuple[str, str, str, str]] = []  # id, error, stop reason, executor
        examined: list[str] = []
        more = False
        async with self.pool.acquire() as conn, conn.transaction():
            admission = Admission(conn, self.clock(), self.closed_spend)
            batch = limit
            while True:
                executors = [
                    name
                    for name, entries in slots.items()
                    if any(free_slots[d] > 0 for d, _ in entries)
                ]
                if not executors:
                    break
                rows = await conn.fetch(CANDIDATES, executors, batch, examined)
                examined.extend(str(r["id"]) for r in rows)
                await admission.cover([json.loads(r["labels"]) for r in rows])
                used = await self._used(conn, rows)
                for row in rows:
                    free = slots.get(row["executor"], [])
                    pick = next(
                        (
                            i
                            for i, (daemon, offers) in enumerate(free)
                            if free_slots[daemon] > 0
                            and (
                                not offers[row["executor"]]
                                or row["model"] in offers[row["executor"]]
                            )
                        ),
                        None,
                    )
                    if pick is None:
                        continue
                    job_id, execution_id = str(row["id"]), str(uuid.uuid4())
                    labels = json.loads(row["labels"])
                    spec = json.loads(row["spec"])
                    limits = self._limits(row, used.get(job_id), default_max_turns, failed)
                    if limits is None:
                        continue
                    verdict = admission.admit(execution_id, labels, limits, spec)
                    if isinstance(verdict, Refusal):
                        if verdict.action == "hold":
                            held.append((job_id, verdict.reason, verdict.retry_at))
                        else:
                            failed.append((job_id, verdict.reason, "budget", row["executor"]))
                        continue
                    daemon_id, _ = free.pop(pick)
                    free_slots[daemon_id] -= 1
                    # The same daemon has other free slots further down the list; keep the
                    # list least-loaded-first by taking the slot and leaving the others.
                    claimed.append(
                        ClaimedJob(
                            execution_id=execution_id,
                            job_id=job_id,
                            attempt=row["attempts"] + 1,
                            daemon_id=daemon_id,
                            executor=row["executor"],
                            model=row["model"],
                            spec=spec,
                            limits=verdict,
                            labels=labels,
                            queue_wait_seconds=max(0.0, float(row["waited"])),
                        )
                    )
                if len(rows) < batch:
                    break
                if len(examined) >= MAX_EXAMINED:
                    more = True
                    break
                batch = max(limit, 64)
            await self._write_claim(conn, claimed, offer_timeout, admission, held, failed)
        return Claim(claimed, [f[3] for f in failed], more)

    def _limits(
        self,
        row: Any,
        used: Used | None,
        default_max_turns: int | None,
        failed: list[tuple[str, str, str, str]],
    ) -> dict[str, Any] | None:
        """The job's limits for this attempt, or None when it is failed instead (its limits
        used up by earlier attempts, or a stored limit the wire cannot carry)."""
        try:
            limits = json.loads(row["limits"])
            if not isinstance(limits, dict):
                raise LimitError(f"limits {row['limits']}: not an object")
            verdict = offer_limits(limits, used, default_max_turns)
        except LimitError as exc:
            failed.append(
                (str(row["id"]), f"cannot offer the job: {exc}", "error", row["executor"])
            )
            return None
        if isinstance(verdict, Exhausted):
            error = exhausted_error(verdict, row["attempts"])
            failed.append((str(row["id"]), error, verdict.stop_reason, row["executor"]))
            return None
        return verdict

    @staticmethod
    async def _used(conn: asyncpg.Connection, rows: list[Any]) -> dict[str, Used]:
        """What the earlier attempts of the retried jobs among ``rows`` spent."""
        retried = [r["id"] for r in rows if r["attempts"] > 0]
        if not retried:
            return {}
        return {
            str(r["job_id"]): Used(
                cost_usd=r["cost"],
                turns=int(r["turns"]),
                tokens=int(r["tokens"]),
                output_tokens=int(r["output"]),
                run_ms=float(r["run_ms"]),
            )
            for r in await conn.fetch(USED_BY_EARLIER_ATTEMPTS, retried)
        }

    async def _write_claim(
        self,
        conn: asyncpg.Connection,
        claimed: list[ClaimedJob],
        offer_timeout: float,
        admission: Admission,
        held: list[tuple[str, str, datetime | None]],
        failed: list[tuple[str, str, str, str]],
    ) -> None:
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
        await admission.record()
        if held:
            await conn.execute(
                budgets.HOLD_JOBS, *map(list, zip(*held, strict=True)), self.hold_recheck
            )
        if failed:
            await conn.execute(
                budgets.FAIL_JOBS, *map(list, zip(*[f[:3] for f in failed], strict=True))
            )

    async def next_available_in(self) -> float | None:
        """Seconds until the earliest backed-off queued job becomes available, or None."""
        value = await self.pool.fetchval(
            "SELECT extract(epoch FROM min(available_at) - now()) FROM jobs "
            "WHERE status = 'queued' AND available_at > now()"
        )
        return None if value is None else max(0.0, float(value))

"""SQL of the claim: queued jobs matched to free daemon slots, under their limits and budgets.

A claim reads only the jobs a free slot can take (executor and model), and looks past the
ones a budget holds or refuses, so they never starve the jobs behind them. A retried job is
offered what its earlier attempts left of its limits (``store/job_limits.py``); a job with
nothing left, or refused by a budget with action fail, is failed in the same transaction,
and the claim returns the executors of what it failed so that they are counted once, after
the commit.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
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
    with_default_turns,
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


# A claim looks at most this many queued jobs (held or refused) before it returns and asks to
# be called again.
MAX_EXAMINED = 1000
# A claim deciding for longer (waiting for budget locks, say) is rolled back; its commit is
# never cut short, so what it decided is always offered and counted.
CLAIM_DEADLINE = 30.0

# The claim's candidates, best first, only those a free slot can take: executors with a slot
# for any model ($1), or (executor, model) pairs a restricted slot serves ($4, $5). The jobs
# it already looked at are skipped. Only what admission needs of the spec is read here.
CANDIDATES = """
SELECT id, executor, model, limits, labels, attempts,
       coalesce(spec -> 'allowUnpriced' = 'true'::jsonb, false) AS allows_unpriced,
       extract(epoch FROM now() - available_at) AS waited
FROM jobs
WHERE status = 'queued' AND available_at <= now() AND NOT cancel_requested
  AND (executor = ANY($1::text[])
       OR (executor, model) IN (SELECT * FROM unnest($4::text[], $5::text[])))
  AND id <> ALL($3::uuid[])
ORDER BY priority DESC, available_at, created_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

# What the earlier attempts of retried jobs used: a job's limits bound the job. ``bound_*``
# count an attempt whose usage is not known yet (ended by the reaper without its result,
# within its ``counted_until``) as at least what it was offered: its daemon, cut off, may
# still be spending: its run time as at least its offered timeoutMs (as recorded, a lost
# attempt's run time ends at its last sign of life). An attempt with
# calls of unknown cost (inconsistent or missing usage on a priced model) counts as at least
# its offered budgetUsd: its daemon counted those calls at their upper bound against it, which
# the ledger cannot (unless the job runs unpriced models on purpose: they count $0).
USED_BY_EARLIER_ATTEMPTS = """
WITH e AS (
    SELECT x.job_id, x.num_turns, x.output_tokens, x.offered_limits AS o, x.counted_until,
           CASE WHEN x.unpriced_calls > 0
                     AND NOT coalesce(j.spec -> 'allowUnpriced' = 'true'::jsonb, false)
                THEN greatest(coalesce(x.cost_usd, 0),
                              (x.offered_limits ->> 'budgetUsd')::numeric)
                ELSE x.cost_usd END AS cost_usd,
           coalesce(x.input_tokens, 0) + coalesce(x.output_tokens, 0)
               + coalesce(x.cache_read_input_tokens, 0)
               + coalesce(x.cache_creation_input_tokens, 0) AS tokens,
           coalesce(x.duration_ms::float8,
                    extract(epoch FROM CASE WHEN x.status = 'lost'
                                            THEN coalesce(x.lease_renewed_at, x.started_at)
                                            ELSE x.finished_at END - x.started_at)::float8 * 1000)
               AS run_ms,
           x.result_recorded_at IS NULL AND x.counted_until > now() AS pending
    FROM executions x JOIN jobs j ON j.id = x.job_id
    WHERE x.job_id = ANY($1::uuid[])
)
SELECT job_id, coalesce(sum(cost_usd), 0) AS cost, coalesce(sum(num_turns), 0) AS turns,
       coalesce(sum(tokens), 0) AS tokens, coalesce(sum(output_tokens), 0) AS output,
       coalesce(sum(run_ms), 0) AS run_ms,
       coalesce(sum(CASE WHEN pending THEN greatest(coalesce(run_ms, 0),
                                                   (o ->> 'timeoutMs')::float8)
                         ELSE run_ms END), 0) AS bound_run_ms,
       coalesce(sum(CASE WHEN pending THEN greatest(coalesce(cost_usd, 0),
                                                   (o ->> 'budgetUsd')::numeric)
                         ELSE cost_usd END), 0) AS bound_cost,
       coalesce(sum(CASE WHEN pending THEN greatest(coalesce(num_turns, 0),
                                                   (o ->> 'maxTurns')::bigint)
                         ELSE num_turns END), 0) AS bound_turns,
       coalesce(sum(CASE WHEN pending THEN greatest(tokens, (o ->> 'maxTotalTokens')::bigint)
                         ELSE tokens END), 0) AS bound_tokens,
       coalesce(sum(CASE WHEN pending THEN greatest(coalesce(output_tokens, 0),
                                                   (o ->> 'maxOutputTokens')::bigint)
                         ELSE output_tokens END), 0) AS bound_output,
       min(counted_until) FILTER (WHERE pending) AS pending_until
FROM e GROUP BY job_id
"""


@dataclass(frozen=True, slots=True)
class EarlierAttempts:
    """What a retried job's earlier attempts used: as recorded, and with the attempts whose
    usage is not known yet counted as what they were offered (until ``pending_until``)."""

    recorded: Used
    bound: Used
    pending_until: datetime | None


def _free_for(
    slots: dict[str, list[tuple[str, dict[str, frozenset[str]]]]], free_slots: dict[str, int]
) -> tuple[list[str], list[str], list[str]]:
    """What the free slots can take: executors with a slot for any model, and the (executor,
    model) pairs of the restricted ones."""
    anything: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for name, entries in slots.items():
        for daemon, offers in entries:
            if free_slots[daemon] <= 0:
                continue
            if not offers[name]:
                anything.add(name)
            else:
                pairs.update((name, m) for m in offers[name])
    kept = sorted(pair for pair in pairs if pair[0] not in anything)
    return sorted(anything), [k[0] for k in kept], [k[1] for k in kept]


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
        deadline: float = CLAIM_DEADLINE,
    ) -> Claim:
        """Claim queued jobs for free daemon slots (SKIP LOCKED) and create their executions.

        ``slots`` maps executor name to a list of ``(daemon_id, executors)`` entries, one per
        free slot, least loaded daemon first; a daemon's executor entry lists the models it is
        restricted to (empty: any model). Only jobs a free slot can take are looked at; jobs
        a budget holds or refuses do not use up the claim: it looks further down the queue
        (at most :data:`MAX_EXAMINED` jobs, then ``more`` says to claim again). An offer with
        none of maxTurns, budgetUsd and timeoutMs gets ``default_max_turns``. Deciding is
        bounded by ``deadline`` seconds (then rolled back); the commit is not. Returns the
        jobs claimed and the executors of the jobs it failed, once its transaction committed.
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
        skipped: list[str] = []  # left queued: the slots went to jobs before them
        more = False
        # A pool exhausted by others (the ledger under load) makes the claim wait no longer
        # than its deadline either.
        async with self.pool.acquire(timeout=deadline) as conn, conn.transaction():
            async with asyncio.timeout(deadline):
                admission = Admission(conn, self.clock(), self.closed_spend)
                batch = limit
                while True:
                    anything, pair_executors, pair_models = _free_for(slots, free_slots)
                    if not anything and not pair_executors:
                        break
                    rows = await conn.fetch(
                        CANDIDATES, anything, batch, examined, pair_executors, pair_models
                    )
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
                            skipped.append(str(row["id"]))
                            continue
                        job_id, execution_id = str(row["id"]), str(uuid.uuid4())
                        labels = json.loads(row["labels"])
                        limits = self._limits(row, used.get(job_id), held, failed)
                        if limits is None:
                            continue
                        verdict = admission.admit(
                            execution_id, labels, limits, row["allows_unpriced"]
                        )
                        if isinstance(verdict, Refusal):
                            if verdict.action == "hold":
                                held.append((job_id, verdict.reason, verdict.retry_at))
                            else:
                                failed.append((job_id, verdict.reason, "budget", row["executor"]))
                            continue
                        daemon_id, _ = free.pop(pick)
                        free_slots[daemon_id] -= 1
                        claimed.append(
                            ClaimedJob(
                                execution_id=execution_id,
                                job_id=job_id,
                                attempt=row["attempts"] + 1,
                                daemon_id=daemon_id,
                                executor=row["executor"],
                                model=row["model"],
                                spec={},
                                limits=with_default_turns(verdict, default_max_turns),
                                labels=labels,
                                queue_wait_seconds=max(0.0, float(row["waited"])),
                            )
                        )
                    if len(rows) < batch:
                        break
                    if len(examined) >= MAX_EXAMINED:
                        # Called again at once only when this claim decided something: the
                        # next one then looks at other jobs; never the same ones again.
                        more = bool(claimed or held or failed)
                        break
                    batch = max(limit, 64)
                claimed = await self._with_specs(conn, claimed)
                await self._write_claim(
                    conn, claimed, offer_timeout, admission, held, failed, skipped
                )
        return Claim(claimed, [f[3] for f in failed], more)

    @staticmethod
    async def _with_specs(conn: asyncpg.Connection, claimed: list[ClaimedJob]) -> list[ClaimedJob]:
        """The claimed jobs with their specs (read only for the jobs offered)."""
        if not claimed:
            return claimed
        rows = await conn.fetch(
            "SELECT id, spec FROM jobs WHERE id = ANY($1::uuid[])", [c.job_id for c in claimed]
        )
        specs = {str(r["id"]): json.loads(r["spec"]) for r in rows}
        return [replace(c, spec=specs[c.job_id]) for c in claimed]

    def _limits(
        self,
        row: Any,
        used: EarlierAttempts | None,
        held: list[tuple[str, str, datetime | None]],
        failed: list[tuple[str, str, str, str]],
    ) -> dict[str, Any] | None:
        """The job's limits for this attempt, or None when it is failed instead (its limits
        used up by earlier attempts, or a stored limit the wire cannot carry) or held (used
        up only if its attempts whose usage is not known yet spend what they were offered)."""
        try:
            limits = json.loads(row["limits"])
            if not isinstance(limits, dict):
                raise LimitError(f"limits {row['limits']}: not an object")
            verdict = offer_limits(limits, used.bound if used is not None else None)
            if isinstance(verdict, Exhausted) and used is not None and used.pending_until:
                if not isinstance(offer_limits(limits, used.recorded), Exhausted):
                    reason = (
                        f"job limits: waiting for the usage of its attempt(s) ended without "
                        f"a result (counted as offered until {used.pending_until.isoformat()})"
                        f": {verdict.reason}"
                    )
                    held.append((str(row["id"]), reason, used.pending_until))
                    return None
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
    async def _used(conn: asyncpg.Connection, rows: list[Any]) -> dict[str, EarlierAttempts]:
        """What the earlier attempts of the retried jobs among ``rows`` used."""
        retried = [r["id"] for r in rows if r["attempts"] > 0]
        if not retried:
            return {}
        return {
            str(r["job_id"]): EarlierAttempts(
                recorded=Used(
                    cost_usd=r["cost"],
                    turns=int(r["turns"]),
                    tokens=int(r["tokens"]),
                    output_tokens=int(r["output"]),
                    run_ms=float(r["run_ms"]),
                ),
                bound=Used(
                    cost_usd=r["bound_cost"],
                    turns=int(r["bound_turns"]),
                    tokens=int(r["bound_tokens"]),
                    output_tokens=int(r["bound_output"]),
                    run_ms=float(r["bound_run_ms"]),
                ),
                pending_until=r["pending_until"],
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
        skipped: list[str],
    ) -> None:
        if claimed:
            await conn.execute(
                """
                INSERT INTO executions (id, job_id, attempt, daemon_id, status,
                                        lease_expires_at, offered_limits)
                SELECT u.id, u.job_id, u.attempt, u.daemon_id, 'offered',
                       now() + make_interval(secs => $5), u.limits
                FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $6::jsonb[])
                     AS u(id, job_id, attempt, daemon_id, limits)
                """,
                [c.execution_id for c in claimed],
                [c.job_id for c in claimed],
                [c.attempt for c in claimed],
                [c.daemon_id for c in claimed],
                offer_timeout,
                [json.dumps(c.limits) for c in claimed],
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
        if skipped:
            # Other orchestrators skipped these rows while this claim held them; they are
            # queued still: wake them (the notification is sent at commit).
            await conn.execute("SELECT pg_notify('tally_jobs', $1 || ' queued -')", skipped[0])

    async def next_available_in(self) -> float | None:
        """Seconds until the earliest backed-off queued job becomes available, or None."""
        value = await self.pool.fetchval(
            "SELECT extract(epoch FROM min(available_at) - now()) FROM jobs "
            "WHERE status = 'queued' AND available_at > now()"
        )
        return None if value is None else max(0.0, float(value))

"""Budgets: spend limits per label selector over a period, enforced in the claim transaction.

A queued job whose labels match budgets is offered only when each of them has room for the
job's reservation: its ``budgetUsd`` (else the smallest default reservation of its budgets),
and for the budgets with a token limit, its ``maxTotalTokens`` (else the smallest of what each
of them allows: its default token reservation, or its whole room). The reservation becomes
the job's per-job cap in its offer (clamped to the wire's bounds), so a running job can spend
no more than it reserved plus the executor's per-job bound. As soon as a claim meets a job
that any budget matches, it locks every budget (in name order, once) for the rest of its
transaction, so orchestrators sharing the database decide one after another on the same
figures, and no two claims can lock budgets in different orders.

Spend in a period is read from the hourly rollups, and what live attempts reserved and have
not spent yet from their reservations, in one statement (``store/spend.py``). A budget row
the database should have refused (a NaN or infinite amount, a time zone this host does not
know) refuses its own jobs with the reason, and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from orchestrator.store.spend import ClosedSpend, figures
from shared.errors import ConfigError

Period = Literal["day", "week", "month", "lifetime"]
Action = Literal["hold", "fail"]
PERIODS = ("day", "week", "month", "lifetime")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# An attempt ended without its result (lost, or its offer timed out) keeps counting (its
# reservations, its offered limits) until its result is recorded, at most this long after the
# reaper ended it (its daemon may never come back).
LOST_RESERVATION_HOLD = 3600.0

COLUMNS = """name, selector, limit_usd, limit_tokens, period, time_zone, action, soft_ratio,
    default_reservation_usd, default_reservation_tokens, refuse_unpriced"""

HELD = """
SELECT b.name, count(j.id) AS held FROM budgets b
LEFT JOIN jobs j ON j.status = 'queued' AND starts_with(j.hold_reason, 'budget ' || b.name || ':')
GROUP BY b.name
"""

RESERVE = """
INSERT INTO budget_reservations (budget, execution_id, amount_usd, tokens)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::numeric[], $4::bigint[])
"""

# Jobs a budget holds stay queued with the reason, looked at again after the recheck
# interval or at their period's reset, whichever is sooner.
HOLD_JOBS = """
UPDATE jobs j SET hold_reason = u.reason,
    available_at = least(coalesce(u.retry_at, 'infinity'), now() + make_interval(secs => $4))
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS u(id, reason, retry_at)
WHERE j.id = u.id
"""

# Jobs refused at the claim (a budget with action fail: stopReason "budget"; a job whose
# limits its earlier attempts used up: the limit's stopReason) end as failed, never offered.
FAIL_JOBS = """
UPDATE jobs j SET status = 'failed', stop_reason = u.stop_reason, error = u.reason,
    hold_reason = NULL, finished_at = now()
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(id, reason, stop_reason)
WHERE j.id = u.id
"""

# Reservations that hold nothing any more: of attempts whose result is recorded, or ended
# without one and no longer counted (``executions.counted_until``, set by the reaper for a lost
# attempt or an expired offer: its daemon may still be spending). Removed by the upkeep, rows
# locked in key order and skipped when taken: a `budgets delete` (which cascades into the same
# rows in key order) or another orchestrator's upkeep is never waited for, so never deadlocked.
DROP_SETTLED = """
WITH settled AS (
    SELECT r.budget, r.execution_id
    FROM budget_reservations r JOIN executions e ON e.id = r.execution_id
    WHERE e.result_recorded_at IS NOT NULL
       OR (e.status NOT IN ('offered', 'running')
           AND (e.counted_until IS NULL OR e.counted_until <= now()))
    ORDER BY r.budget, r.execution_id
    FOR UPDATE OF r SKIP LOCKED
)
DELETE FROM budget_reservations r USING settled s
WHERE r.budget = s.budget AND r.execution_id = s.execution_id
"""


def _day_start(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of a local day: its midnight, or, where a DST change skips midnight,
    the instant the clocks jump (fold 0 maps a skipped wall time to the offset before the
    change), and the first of two midnights where the clocks go back over it."""
    return datetime(day.year, day.month, day.day, tzinfo=tz, fold=0).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget as stored."""

    name: str
    selector: dict[str, str]
    limit_usd: Decimal
    period: Period
    action: Action
    default_reservation_usd: Decimal
    limit_tokens: int | None = None
    time_zone: str = "UTC"
    soft_ratio: Decimal = Decimal("0.8")
    default_reservation_tokens: int | None = None
    refuse_unpriced: bool = False
    # Why this row cannot be enforced (it refuses its jobs); None for a sound row.
    problem: str | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a job with ``labels`` falls under this budget."""
        return all(labels.get(k) == v for k, v in self.selector.items())

    def window(self, now: datetime) -> tuple[datetime, datetime | None]:
        """The current period: its start and its next reset (None: a lifetime cap)."""
        if self.period == "lifetime":
            return EPOCH, None
        tz = ZoneInfo(self.time_zone)
        today = now.astimezone(tz).date()
        if self.period == "week":
            first = today - timedelta(days=today.weekday())
            following = first + timedelta(days=7)
        elif self.period == "month":
            first = today.replace(day=1)
            following = (first + timedelta(days=32)).replace(day=1)
        else:
            first, following = today, today + timedelta(days=1)
        # Calendar arithmetic on dates, then each bound to its real instant (a DST day is 23
        # or 25 hours, and its midnight may be skipped or repeated).
        return _day_start(first, tz), _day_start(following, tz)


def check_time_zone(name: str) -> None:
    """ConfigError unless ``name`` is an IANA zone whose offsets are whole hours (periods
    begin on the rollups' UTC hours)."""
    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--time-zone {name!r}: not a known IANA time zone") from None
    year = datetime.now(UTC).year
    for month in (1, 7):
        offset = datetime(year, month, 1, tzinfo=tz).utcoffset() or timedelta()
        if offset.total_seconds() % 3600:
            raise ConfigError(
                f"--time-zone {name!r}: its UTC offset {offset} is not a whole number of hours; "
                "budget periods begin on the ledger's hourly rollups"
            )


def _problem(row: Any) -> str | None:
    """What makes a stored row unenforceable (rows written before migration 0014, or a time
    zone missing from this host's tz database)."""
    for column in ("limit_usd", "default_reservation_usd", "soft_ratio"):
        value = row[column]
        if not isinstance(value, Decimal) or not value.is_finite():
            return f"{column} is {value} (not a finite number); fix it with tally budgets set"
    try:
        ZoneInfo(row["time_zone"])
    except (ZoneInfoNotFoundError, ValueError):
        return f"time zone {row['time_zone']!r} is unknown on this host"
    return None


def _budget(row: Any) -> Budget:
    return Budget(
        name=row["name"],
        selector=json.loads(row["selector"]),
        limit_usd=row["limit_usd"],
        limit_tokens=row["limit_tokens"],
        period=row["period"],
        time_zone=row["time_zone"],
        action=row["action"],
        soft_ratio=row["soft_ratio"],
        default_reservation_usd=row["default_reservation_usd"],
        default_reservation_tokens=row["default_reservation_tokens"],
        refuse_unpriced=row["refuse_unpriced"],
        problem=_problem(row),
    )


async def load(conn: asyncpg.Connection, lock: bool = False) -> list[Budget]:
    """Every budget in name order; with ``lock``, locked for the transaction in that order."""
    suffix = " FOR UPDATE" if lock else ""
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM budgets ORDER BY name{suffix}")
    return [_budget(r) for r in rows]


@dataclass(slots=True)
class Standing:
    """A budget's figures in its current period."""

    budget: Budget
    start: datetime
    reset: datetime | None
    spent_usd: Decimal
    spent_tokens: int
    unpriced_calls: int
    reserved_usd: Decimal = Decimal(0)
    reserved_tokens: int = 0
    held: int = 0
    # Its spend in closed hours is still being summed (no figures yet): its jobs wait.
    loading: bool = False

    @property
    def room_usd(self) -> Decimal:
        return self.budget.limit_usd - self.spent_usd - self.reserved_usd

    @property
    def room_tokens(self) -> int | None:
        if self.budget.limit_tokens is None:
            return None
        return self.budget.limit_tokens - self.spent_tokens - self.reserved_tokens

    def describe(self) -> str:
        """The hold reason's figures."""
        if self.budget.problem is not None:
            return f"budget {self.budget.name}: cannot be enforced: {self.budget.problem}"
        if self.loading:
            return (
                f"budget {self.budget.name}: figures loading (its spend since "
                f"{self.start.isoformat()} is being summed)"
            )
        text = (
            f"budget {self.budget.name}: ${self.spent_usd:.6f} spent + "
            f"${self.reserved_usd:.6f} reserved of ${self.budget.limit_usd}"
        )
        if self.budget.limit_tokens is not None:
            text += (
                f", {self.spent_tokens} + {self.reserved_tokens} tokens of "
                f"{self.budget.limit_tokens}"
            )
        if self.reset is not None:
            text += f" (resets {self.reset.isoformat()})"
        return text


async def standings(
    conn: asyncpg.Connection,
    budgets: list[Budget],
    now: datetime,
    closed: ClosedSpend | None = None,
    advance: bool = True,
) -> dict[str, Standing]:
    """Each budget's spend and reservations in its current period, read in one statement
    (closed hours from ``closed`` when given). A row that cannot be enforced stands with no
    figures. Without ``advance`` the closed hours are not summed here: a budget whose sum is
    not ready (:meth:`ClosedSpend.cold`) stands as ``loading``, with no figures."""
    out: dict[str, Standing] = {}
    wanted: list[tuple[str, str, datetime]] = []
    for budget in budgets:
        if budget.problem is not None:
            out[budget.name] = Standing(budget, EPOCH, None, Decimal(0), 0, 0)
            continue
        start, reset = budget.window(now)
        out[budget.name] = Standing(budget, start, reset, Decimal(0), 0, 0)
        selector = json.dumps(budget.selector, sort_keys=True)
        if not advance and closed is not None and closed.cold(selector, start, now):
            out[budget.name].loading = True
            continue
        wanted.append((budget.name, selector, start))
    # Without a process's cache, a throwaway one: closed hours by their own statements (they
    # do not change), the open hours with the reservations in one.
    closed = closed if closed is not None else ClosedSpend()
    if advance:
        await closed.advance(conn, [(w[1], w[2]) for w in wanted])
    for name, (spent, reserved) in (await figures(conn, wanted, closed)).items():
        standing = out[name]
        standing.spent_usd, standing.spent_tokens = spent.usd, spent.tokens
        standing.unpriced_calls = spent.unpriced
        standing.reserved_usd, standing.reserved_tokens = reserved.usd, reserved.tokens
    return out


async def upsert(conn: asyncpg.Connection, budget: Budget) -> None:
    """Create or replace a budget; held jobs are looked at again at once.

    Locks are taken in the claim's order, job rows before budget rows (a claim holds its
    candidate jobs and then locks the budgets): the held jobs are released first."""
    async with conn.transaction():
        await release_held(conn)
        await conn.execute(
            f"""
            INSERT INTO budgets ({COLUMNS})
            VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            ON CONFLICT (name) DO UPDATE SET selector = excluded.selector,
                limit_usd = excluded.limit_usd, limit_tokens = excluded.limit_tokens,
                period = excluded.period, time_zone = excluded.time_zone,
                action = excluded.action, soft_ratio = excluded.soft_ratio,
                default_reservation_usd = excluded.default_reservation_usd,
                default_reservation_tokens = excluded.default_reservation_tokens,
                refuse_unpriced = excluded.refuse_unpriced, updated_at = now()
            """,
            budget.name,
            json.dumps(budget.selector),
            budget.limit_usd,
            budget.limit_tokens,
            budget.period,
            budget.time_zone,
            budget.action,
            budget.soft_ratio,
            budget.default_reservation_usd,
            budget.default_reservation_tokens,
            budget.refuse_unpriced,
        )


async def release_held(conn: asyncpg.Connection) -> None:
    """Make held jobs available now (a budget changed: they are decided again), locked in id
    order (a job a claim holds is waited for, then released if that claim held it)."""
    await conn.execute(
        """
        WITH held AS (
            SELECT id FROM jobs
            WHERE status = 'queued' AND hold_reason IS NOT NULL AND available_at > now()
            ORDER BY id FOR UPDATE
        ), moved AS (
            UPDATE jobs j SET available_at = now() FROM held WHERE j.id = held.id RETURNING j.id
        )
        -- Dispatchers wake on a queued job's notification (sent at commit).
        SELECT pg_notify('tally_jobs', id::text || ' queued -') FROM (SELECT min(id::text) AS id
            FROM moved) m WHERE id IS NOT NULL
        """
    )


async def release_loading(conn: asyncpg.Connection) -> None:
    """Make the jobs held while their budgets' figures were loading available now (locked in
    id order, as :func:`release_held`)."""
    await conn.execute(
        """
        WITH held AS (
            SELECT id FROM jobs
            WHERE status = 'queued' AND hold_reason LIKE 'budget %: figures loading%'
              AND available_at > now()
            ORDER BY id FOR UPDATE
        ), moved AS (
            UPDATE jobs j SET available_at = now() FROM held WHERE j.id = held.id RETURNING j.id
        )
        -- Dispatchers wake on a queued job's notification (sent at commit).
        SELECT pg_notify('tally_jobs', id::text || ' queued -') FROM (SELECT min(id::text) AS id
            FROM moved) m WHERE id IS NOT NULL
        """
    )


async def delete(conn: asyncpg.Connection, name: str) -> bool:
    """Remove a budget; its held jobs are decided again at once (jobs locked first, as in
    :func:`upsert`)."""
    async with conn.transaction():
        await release_held(conn)
        status = await conn.execute("DELETE FROM budgets WHERE name = $1", name)
    return bool(status != "DELETE 0")


async def report(
    conn: asyncpg.Connection,
    now: datetime,
    closed: ClosedSpend | None = None,
    advance: bool = True,
) -> list[Standing]:
    """Every budget's standing, with its held jobs counted (a row that cannot be enforced
    is reported with its problem, never raised; see :func:`standings` for ``advance``)."""
    budgets = await load(conn)
    figures_now = await standings(conn, budgets, now, closed, advance)
    for row in await conn.fetch(HELD):
        if row["name"] in figures_now:
            figures_now[row["name"]].held = int(row["held"])
    return [figures_now[b.name] for b in budgets]


def _finite(value: Decimal) -> float | None:
    return float(value) if value.is_finite() else None


def standing_record(s: Standing) -> dict[str, Any]:
    """One budget's standing, for JSON, CSV and the usage API (a non-finite amount of a bad
    row is null, and ``problem`` says why the row cannot be enforced)."""
    b = s.budget
    return {
        "name": b.name,
        "selector": b.selector,
        "period": b.period,
        "timeZone": b.time_zone,
        "action": b.action,
        "limitUsd": _finite(b.limit_usd),
        "spentUsd": float(s.spent_usd),
        "reservedUsd": float(s.reserved_usd),
        "remainingUsd": _finite(s.room_usd),
        "limitTokens": b.limit_tokens,
        "spentTokens": s.spent_tokens,
        "reservedTokens": s.reserved_tokens if b.limit_tokens is not None else None,
        "unpricedCalls": s.unpriced_calls,
        "softRatio": _finite(b.soft_ratio),
        "heldJobs": s.held,
        "periodStart": s.start.isoformat(),
        "nextReset": s.reset.isoformat() if s.reset else None,
        "problem": b.problem,
        # Its closed hours not summed yet (the usage API never sums them): no figures yet.
        "loading": s.loading,
    }

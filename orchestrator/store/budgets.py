"""Budgets: spend limits per label selector over a period, enforced in the claim transaction.

A queued job whose labels match budgets is offered only when each of them has room for the
job's reservation: its ``budgetUsd`` (else the budget's default reservation), and for a
budget with a token limit its ``maxTotalTokens`` (else the default token reservation). The
reservation becomes the job's per-job cap in its offer, so a running job can spend no more
than it reserved plus the executor's per-job bound. The budgets are locked (in name order)
for the rest of the claim transaction, so orchestrators sharing the database decide one
after another on the same figures.

Spend in a period is read from the hourly rollups; what running attempts reserved and have
not spent yet is read from their reservations and their running totals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from shared.errors import ConfigError

Period = Literal["day", "week", "month", "lifetime"]
Action = Literal["hold", "fail"]
PERIODS = ("day", "week", "month", "lifetime")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

COLUMNS = """name, selector, limit_usd, limit_tokens, period, time_zone, action, soft_ratio,
    default_reservation_usd, default_reservation_tokens, refuse_unpriced"""

SPENT = """
SELECT coalesce(sum(cost_usd), 0) AS usd,
       coalesce(sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)
                    + coalesce(cache_read_input_tokens, 0)
                    + coalesce(cache_creation_input_tokens, 0)), 0) AS tokens,
       coalesce(sum(unpriced_calls), 0) AS unpriced
FROM usage_hourly WHERE hour >= $1 AND labels @> $2::jsonb
"""

# What live attempts reserved and have not spent yet (their spend so far is in the rollups).
RESERVED = """
SELECT r.budget,
       coalesce(sum(greatest(r.amount_usd - coalesce(e.cost_usd, 0), 0)), 0) AS usd,
       coalesce(sum(greatest(r.tokens - coalesce(e.input_tokens, 0)
                    - coalesce(e.output_tokens, 0) - coalesce(e.cache_read_input_tokens, 0)
                    - coalesce(e.cache_creation_input_tokens, 0), 0)), 0) AS tokens
FROM budget_reservations r JOIN executions e ON e.id = r.execution_id
WHERE r.budget = ANY($1::text[]) AND e.status IN ('offered', 'running')
GROUP BY r.budget
"""

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

# Jobs a budget with action fail refuses end as failed, stopReason "budget", never offered.
FAIL_JOBS = """
UPDATE jobs j SET status = 'failed', stop_reason = 'budget', error = u.reason,
    hold_reason = NULL, finished_at = now()
FROM unnest($1::uuid[], $2::text[]) AS u(id, reason)
WHERE j.id = u.id
"""

# Reservations of decided attempts hold nothing: removed by the upkeep.
DROP_SETTLED = """
DELETE FROM budget_reservations r USING executions e
WHERE e.id = r.execution_id AND e.status NOT IN ('offered', 'running')
"""


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

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a job with ``labels`` falls under this budget."""
        return all(labels.get(k) == v for k, v in self.selector.items())

    def window(self, now: datetime) -> tuple[datetime, datetime | None]:
        """The current period: its start and its next reset (None: a lifetime cap)."""
        if self.period == "lifetime":
            return EPOCH, None
        local = now.astimezone(ZoneInfo(self.time_zone))
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "week":
            start -= timedelta(days=start.weekday())
            end = start + timedelta(days=7)
        elif self.period == "month":
            start = start.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
        else:
            end = start + timedelta(days=1)
        # Wall-clock arithmetic, then back to an aware instant (DST days are 23 or 25 hours).
        tz = ZoneInfo(self.time_zone)
        return (
            start.replace(tzinfo=tz).astimezone(UTC),
            end.replace(tzinfo=tz).astimezone(UTC),
        )


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
    )


async def load(conn: asyncpg.Connection, lock: list[str] | None = None) -> list[Budget]:
    """Every budget; with ``lock``, only those, locked for the transaction in name order."""
    if lock is None:
        rows = await conn.fetch(f"SELECT {COLUMNS} FROM budgets ORDER BY name")
    else:
        rows = await conn.fetch(
            f"SELECT {COLUMNS} FROM budgets WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE",
            lock,
        )
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
    conn: asyncpg.Connection, budgets: list[Budget], now: datetime
) -> dict[str, Standing]:
    """Each budget's spend and reservations in its current period."""
    out: dict[str, Standing] = {}
    for budget in budgets:
        start, reset = budget.window(now)
        row = await conn.fetchrow(SPENT, start, json.dumps(budget.selector))
        out[budget.name] = Standing(
            budget, start, reset, row["usd"], int(row["tokens"]), int(row["unpriced"])
        )
    if out:
        for row in await conn.fetch(RESERVED, list(out)):
            standing = out[row["budget"]]
            standing.reserved_usd = row["usd"]
            standing.reserved_tokens = int(row["tokens"])
    return out


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a job may not be offered now, and what its budget's action is."""

    action: Action
    reason: str
    retry_at: datetime | None  # the period's reset, for a held job


@dataclass(slots=True)
class Admission:
    """Budget decisions within one claim transaction: figures read once, reservations added
    as jobs are admitted."""

    standings: dict[str, Standing]
    reservations: list[tuple[str, str, Decimal, int | None]] = field(default_factory=list)

    @classmethod
    async def open(
        cls, conn: asyncpg.Connection, rows: list[Any], now: datetime
    ) -> Admission | None:
        """Lock the budgets that match any of the candidate jobs; None when none do."""
        budgets = await load(conn)
        if not budgets:
            return None
        labels = [json.loads(r["labels"]) for r in rows]
        wanted = sorted({b.name for b in budgets if any(b.matches(lb) for lb in labels)})
        if not wanted:
            return None
        return cls(await standings(conn, await load(conn, lock=wanted), now))

    def admit(
        self, execution_id: str, labels: dict[str, str], limits: dict[str, Any], spec: Any
    ) -> Refusal | dict[str, Any]:
        """Reserve for one job against every matching budget and return its capped limits,
        or the refusal of the first budget without room."""
        matching = [s for s in self.standings.values() if s.budget.matches(labels)]
        if not matching:
            return limits
        own = limits.get("budgetUsd")
        usd = (
            Decimal(str(own))
            if own is not None
            else min(s.budget.default_reservation_usd for s in matching)
        )
        own_tokens = limits.get("maxTotalTokens")
        allows_unpriced = isinstance(spec, dict) and spec.get("allowUnpriced") is True
        tokens: int | None = own_tokens
        for s in matching:
            b = s.budget
            if b.refuse_unpriced and allows_unpriced:
                return Refusal(b.action, f"budget {b.name}: refuses jobs on unpriced models", None)
            if s.room_usd < usd:
                return Refusal(b.action, s.describe(), s.reset)
            room_tokens = s.room_tokens
            if room_tokens is not None:
                want = tokens or b.default_reservation_tokens or room_tokens
                if room_tokens <= 0 or room_tokens < want:
                    return Refusal(b.action, s.describe(), s.reset)
                tokens = want
        capped = {**limits, "budgetUsd": float(usd)}
        if tokens is not None:
            capped["maxTotalTokens"] = tokens
        for s in matching:
            s.reserved_usd += usd
            held_tokens = tokens if s.budget.limit_tokens is not None else None
            s.reserved_tokens += held_tokens or 0
            self.reservations.append((s.budget.name, execution_id, usd, held_tokens))
        return capped

    async def record(self, conn: asyncpg.Connection) -> None:
        """Write the reservations of the jobs admitted (after their executions exist)."""
        if self.reservations:
            await conn.execute(RESERVE, *map(list, zip(*self.reservations, strict=True)))


async def upsert(conn: asyncpg.Connection, budget: Budget) -> None:
    """Create or replace a budget; held jobs are looked at again at once."""
    async with conn.transaction():
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
        await release_held(conn)


async def release_held(conn: asyncpg.Connection) -> None:
    """Make held jobs available now (a budget changed: they are decided again)."""
    await conn.execute(
        "UPDATE jobs SET available_at = now() "
        "WHERE status = 'queued' AND hold_reason IS NOT NULL AND available_at > now()"
    )


async def delete(conn: asyncpg.Connection, name: str) -> bool:
    """Remove a budget; its held jobs are decided again at once."""
    async with conn.transaction():
        status = await conn.execute("DELETE FROM budgets WHERE name = $1", name)
        await release_held(conn)
    return bool(status != "DELETE 0")


async def report(conn: asyncpg.Connection, now: datetime) -> list[Standing]:
    """Every budget's standing, with its held jobs counted."""
    budgets = await load(conn)
    figures = await standings(conn, budgets, now)
    for row in await conn.fetch(HELD):
        if row["name"] in figures:
            figures[row["name"]].held = int(row["held"])
    return [figures[b.name] for b in budgets]


def standing_record(s: Standing) -> dict[str, Any]:
    """One budget's standing, for JSON, CSV and the usage API."""
    b = s.budget
    return {
        "name": b.name,
        "selector": b.selector,
        "period": b.period,
        "timeZone": b.time_zone,
        "action": b.action,
        "limitUsd": float(b.limit_usd),
        "spentUsd": float(s.spent_usd),
        "reservedUsd": float(s.reserved_usd),
        "remainingUsd": float(s.room_usd),
        "limitTokens": b.limit_tokens,
        "spentTokens": s.spent_tokens,
        "reservedTokens": s.reserved_tokens if b.limit_tokens is not None else None,
        "unpricedCalls": s.unpriced_calls,
        "softRatio": float(b.soft_ratio),
        "heldJobs": s.held,
        "periodStart": s.start.isoformat(),
        "nextReset": s.reset.isoformat() if s.reset else None,
    }

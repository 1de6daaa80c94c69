"""Budget figures: spend from the hourly rollups and live reservations, read in one statement.

A ledger batch adds to ``usage_hourly`` at the hour of its own transaction's clock
(``clock_timestamp()`` once its executions are locked), so an hour's rows stop changing once
every batch that began in it has committed. Hours that ended more than :data:`CLOSED_MARGIN`
ago are therefore closed: their spend per (selector, period start) is summed once and kept in
memory by :class:`ClosedSpend`, advanced an hour at a time, and a claim reads only the open
hours (a range of the rollups' primary key, which leads with ``hour``) plus the live
reservations, in ONE statement: one snapshot, so a ledger commit (which moves spend from an
attempt's reservation into the rollups in one transaction) is seen entirely or not at all.

The cutoff is taken from the database's clock (the clock the ledger's hours come from). The
margin assumes a ledger transaction commits within an hour of its start; the folding of rollup
shards (``FOLD_ROLLUP_SHARDS``) moves rows between shards of a past hour without changing its
sums. A first sum over a long period can be slow: it is never run inside a claim or under the
snapshot's deadline. The dispatcher's warm-up task sums it (``JobStore.warm_closed_spend``);
until then a budget whose period began more than :data:`RECENT` ago is "loading" (its jobs
held a moment with that reason), and one that began since is read in full from its start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

CLOSED_MARGIN = timedelta(hours=2)
MAX_ENTRIES = 4096
# A period that began less than this long ago is read in full when its closed hours are not
# summed yet (a bounded range of the rollups' primary key).
RECENT = timedelta(hours=48)

CUTOFF = "SELECT date_trunc('hour', now(), 'UTC') - make_interval(secs => $1)"

_TOKENS = """coalesce(sum(coalesce(h.input_tokens, 0) + coalesce(h.output_tokens, 0)
                    + coalesce(h.cache_read_input_tokens, 0)
                    + coalesce(h.cache_creation_input_tokens, 0)), 0)"""

SPENT_BETWEEN = f"""
SELECT coalesce(sum(h.cost_usd), 0) AS usd, {_TOKENS} AS tokens,
       coalesce(sum(h.unpriced_calls), 0) AS unpriced
FROM usage_hourly h WHERE h.hour >= $1 AND h.hour < $2 AND h.labels @> $3::jsonb
"""

# Per budget: the spend since ``since`` and what live attempts reserved and have not spent
# yet (their spend so far is in the rollups). An attempt holds its reservation while offered
# or running, and, once the reaper ended it without its result (lost, or its offer timed
# out), until its result is recorded or ``counted_until``: its daemon may still be spending.
FIGURES = f"""
WITH open_hours AS MATERIALIZED (
    -- Both bounds given, so that even a generic plan reads this as a narrow range of the
    -- primary key (which leads with hour), never as a scan of every hour.
    SELECT h.hour, h.labels, h.cost_usd, h.input_tokens, h.output_tokens,
           h.cache_read_input_tokens, h.cache_creation_input_tokens, h.unpriced_calls
    FROM usage_hourly h WHERE h.hour >= $4 AND h.hour < 'infinity'
)
SELECT b.name, s.usd, s.tokens, s.unpriced, r.usd AS reserved_usd, r.tokens AS reserved_tokens
FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS b(name, selector, since)
CROSS JOIN LATERAL (
    SELECT coalesce(sum(h.cost_usd), 0) AS usd, {_TOKENS} AS tokens,
           coalesce(sum(h.unpriced_calls), 0) AS unpriced
    FROM open_hours h WHERE h.hour >= b.since AND h.labels @> b.selector::jsonb
) s
CROSS JOIN LATERAL (
    SELECT coalesce(sum(greatest(r.amount_usd - coalesce(e.cost_usd, 0), 0)), 0) AS usd,
           coalesce(sum(greatest(r.tokens - coalesce(e.input_tokens, 0)
                        - coalesce(e.output_tokens, 0) - coalesce(e.cache_read_input_tokens, 0)
                        - coalesce(e.cache_creation_input_tokens, 0), 0)), 0) AS tokens
    FROM budget_reservations r JOIN executions e ON e.id = r.execution_id
    WHERE r.budget = b.name AND e.result_recorded_at IS NULL
      AND (e.status IN ('offered', 'running') OR e.counted_until > now())
) r
"""


@dataclass(slots=True)
class Spent:
    """Spend over a range of hours."""

    usd: Decimal = Decimal(0)
    tokens: int = 0
    unpriced: int = 0


@dataclass(slots=True)
class _Closed:
    until: datetime
    spent: Spent


class ClosedSpend:
    """Spend in closed hours per (selector, period start), kept in memory by one process."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, datetime], _Closed] = {}
        # Keys a claim found cold; the warm-up sums them (it waits on ``wanted``).
        self.requested: set[tuple[str, datetime]] = set()
        self.wanted = asyncio.Event()

    async def advance(self, conn: asyncpg.Connection, keys: Sequence[tuple[str, datetime]]) -> int:
        """Bring each (selector, start)'s closed spend up to the cutoff (a full sum the first
        time, then one hour at a time); return how many keys were cold before."""
        cutoff: datetime = await conn.fetchval(CUTOFF, CLOSED_MARGIN.total_seconds())
        if len(self._entries) > MAX_ENTRIES:
            # Past periods' keys go (a budget changed or a period ended); the keys asked for
            # now, every budget's current period among them, stay warm.
            wanted = set(keys)
            for stale in [k for k in self._entries if k not in wanted]:
                del self._entries[stale]
        warmed = 0
        for key in dict.fromkeys(keys):
            selector, start = key
            entry = self._entries.get(key)
            since = start if entry is None else entry.until
            if since >= cutoff:
                if entry is None:
                    self._entries[key] = _Closed(start, Spent())  # nothing closed yet
                    warmed += 1
                continue
            row = await conn.fetchrow(SPENT_BETWEEN, since, cutoff, selector)
            if self._entries.get(key) is not entry:
                continue  # another task advanced it meanwhile (one event loop, many tasks)
            old = entry.spent if entry is not None else Spent()
            warmed += entry is None
            self._entries[key] = _Closed(
                cutoff,
                Spent(
                    old.usd + row["usd"],
                    old.tokens + int(row["tokens"]),
                    old.unpriced + int(row["unpriced"]),
                ),
            )
        self.requested.difference_update(keys)
        return warmed

    def cold(self, selector: str, start: datetime, now: datetime) -> bool:
        """Whether this key's closed hours are not summed yet and its period is too long to
        read in full (the warm-up is asked to sum it)."""
        if (selector, start) in self._entries or start >= now - RECENT:
            return False
        self.requested.add((selector, start))
        self.wanted.set()
        return True

    def get(self, selector: str, start: datetime) -> tuple[datetime, Spent]:
        """Where the open hours begin for this key, and the closed spend before that."""
        entry = self._entries.get((selector, start))
        if entry is None:
            return start, Spent()
        return entry.until, Spent(entry.spent.usd, entry.spent.tokens, entry.spent.unpriced)


async def figures(
    conn: asyncpg.Connection,
    wanted: Sequence[tuple[str, str, datetime]],
    closed: ClosedSpend | None,
) -> dict[str, tuple[Spent, Spent]]:
    """Per budget ``(name, selector json, period start)``: its spend in the period and what
    its live attempts reserved and have not spent, from one statement."""
    if not wanted:
        return {}
    base: dict[str, Spent] = {}
    since: list[datetime] = []
    for name, selector, start in wanted:
        begin, spent = closed.get(selector, start) if closed is not None else (start, Spent())
        base[name] = spent
        since.append(begin)
    rows: list[Any] = await conn.fetch(
        FIGURES, [w[0] for w in wanted], [w[1] for w in wanted], since, min(since)
    )
    out: dict[str, tuple[Spent, Spent]] = {}
    for row in rows:
        spent = base[row["name"]]
        spent.usd += row["usd"]
        spent.tokens += int(row["tokens"])
        spent.unpriced += int(row["unpriced"])
        reserved = Spent(row["reserved_usd"], int(row["reserved_tokens"]))
        out[row["name"]] = (spent, reserved)
    return out

"""The hourly rollups' increments of one ledger batch's calls, pure.

A batch adds to the rows of ``usage_hourly`` at the hour its transaction recorded it, in the
same transaction, by the rule ``tally_usage_contributions()`` (migration 0009) computes from
the detail rows, so that ``tally ledger check`` proves the two equal. A call adds its
buckets, cost, 1 call and its unreported/unpriced flags under its model; a call recorded after
its execution's result adds 1 call only; an execution counts once, at its first call (else at
its result). What a result adds is computed by PostgreSQL in the statement that records it
(``RECORD_RESULTS`` in ``store/ledger_sql.py``), from the rows it writes.

Budgets rely on the hour being the batch's own clock (``clock_timestamp()`` once its
executions are locked): an hour's rows stop changing once the batches begun in it commit, so
``store/spend.py`` sums closed hours once per process.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from shared.usage import BUCKETS, Usage

# (model, provider, executor, labels as the database's jsonb text)
Key = tuple[str, str, str, str]
# The five buckets in shared.usage.BUCKETS order; None: not reported.
Vec = tuple[int | None, int | None, int | None, int | None, int | None]

N = len(BUCKETS)


def vec(usage: Usage) -> Vec:
    """A usage's buckets as a tuple."""
    return (usage.input, usage.output, usage.cache_read, usage.cache_creation, usage.reasoning)


class Cell:
    """One rollup row's increment (a plain slotted class: one is touched per recorded call,
    on the writer's hot path)."""

    __slots__ = ("buckets", "calls", "cost", "executions", "unpriced", "unreported")

    def __init__(self) -> None:
        self.buckets: list[int | None] = [None] * N
        self.cost: Decimal | None = None
        self.calls = 0
        self.executions = 0
        self.unpriced = 0
        self.unreported = [0] * N

    def add(self, values: Vec, cost: Decimal | None) -> None:
        """Add a usage and its cost; None (unknown) adds nothing and keeps a sum unknown."""
        b = self.buckets
        v0, v1, v2, v3, v4 = values
        if v0 is not None:
            b[0] = v0 if b[0] is None else b[0] + v0
        if v1 is not None:
            b[1] = v1 if b[1] is None else b[1] + v1
        if v2 is not None:
            b[2] = v2 if b[2] is None else b[2] + v2
        if v3 is not None:
            b[3] = v3 if b[3] is None else b[3] + v3
        if v4 is not None:
            b[4] = v4 if b[4] is None else b[4] + v4
        if cost is not None:
            self.cost = cost if self.cost is None else self.cost + cost


class Increments:
    """The rollup increments of one batch, per key."""

    __slots__ = ("cells",)

    def __init__(self) -> None:
        self.cells: dict[Key, Cell] = {}

    def cell(self, key: Key) -> Cell:
        """The key's increment, created empty."""
        found = self.cells.get(key)
        if found is None:
            found = self.cells[key] = Cell()
        return found

    def call(
        self,
        key: Key,
        values: Vec,
        cost: Decimal | None,
        *,
        counted: bool,
        first: bool,
    ) -> None:
        """A newly recorded call; ``counted`` False when its execution's result came first."""
        cell = self.cell(key)
        cell.calls += 1
        if not counted:
            return
        cell.add(values, cost)
        cell.executions += first
        cell.unpriced += cost is None
        for i in range(N):
            cell.unreported[i] += values[i] is None

    def rows(self) -> list[dict[str, Any]]:
        """The increments as rows for the upsert, in key order (the order rows are locked)."""
        return [
            {
                "model": key[0],
                "provider": key[1],
                "executor": key[2],
                "labels": key[3],
                **{f"b{i}": v for i, v in enumerate(cell.buckets)},
                "cost": cell.cost,
                "calls": cell.calls,
                "executions": cell.executions,
                "unpriced": cell.unpriced,
                **{f"u{i}": v for i, v in enumerate(cell.unreported)},
            }
            for key, cell in sorted(self.cells.items())
        ]

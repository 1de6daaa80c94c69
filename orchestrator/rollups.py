"""The hourly rollups' increments for one ledger batch, pure.

A batch adds to the rows of ``usage_hourly`` at the hour its transaction recorded it, in the
same transaction. The rule is the one ``tally_usage_contributions()`` (migration 0009)
computes from the detail rows, so that ``tally ledger check`` proves the two equal:

- a call adds its buckets, cost, 1 call and its unreported/unpriced flags under its model; a
  call recorded after its execution's result adds 1 call only;
- a result with per-model entries adds each entry under its model and takes its execution's
  calls back from theirs; then its totals beyond its entries (or, without entries, beyond its
  calls) go to the job's model when any of that is not zero;
- an execution counts once: at its first call, else at its result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shared.usage import BUCKETS, Usage

# (model, provider, executor, labels as the database's jsonb text)
Key = tuple[str, str, str, str]


def _add(a: Any, b: Any) -> Any:
    """Unknown-aware addition: None (unknown) plus None stays None."""
    if b is None:
        return a
    return b if a is None else a + b


@dataclass(slots=True)
class Cell:
    """One rollup row's increment."""

    buckets: list[int | None] = field(default_factory=lambda: [None] * len(BUCKETS))
    cost: Decimal | None = None
    calls: int = 0
    executions: int = 0
    unpriced: int = 0
    unreported: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))

    def add_usage(self, usage: Usage, cost: Decimal | None, sign: int = 1) -> None:
        """Add (or with ``sign=-1`` take back) a usage and its cost."""
        for i, bucket in enumerate(BUCKETS):
            value = getattr(usage, bucket)
            if value is not None:
                self.buckets[i] = _add(self.buckets[i], sign * value)
        if cost is not None:
            self.cost = _add(self.cost, cost if sign > 0 else -cost)


@dataclass(slots=True)
class Increments:
    """The rollup increments of one batch, per key."""

    cells: dict[Key, Cell] = field(default_factory=dict)

    def cell(self, key: Key) -> Cell:
        """The key's increment, created empty."""
        found = self.cells.get(key)
        if found is None:
            found = self.cells[key] = Cell()
        return found

    def call(
        self,
        key: Key,
        usage: Usage,
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
        cell.add_usage(usage, cost)
        cell.executions += first
        cell.unpriced += cost is None
        for i, bucket in enumerate(BUCKETS):
            cell.unreported[i] += getattr(usage, bucket) is None

    def result(
        self,
        job_key: Key,
        totals: Usage,
        cost: Decimal | None,
        unpriced: int,
        entries: Iterable[tuple[Key, Usage, Decimal | None]],
        calls: Iterable[tuple[Key, Usage, Decimal | None, int]],
    ) -> None:
        """A newly recorded result: its execution's totals, per-model entries and calls
        (recorded up to it, per key, with how many of them had no price)."""
        entry_list = list(entries)
        call_list = list(calls)
        base = Cell()
        if entry_list:
            for key, usage, entry_cost in entry_list:
                self.cell(key).add_usage(usage, entry_cost)
                base.add_usage(usage, entry_cost)
            for key, usage, call_cost, _ in call_list:
                self.cell(key).add_usage(usage, call_cost, -1)
        else:
            for _, usage, call_cost, _ in call_list:
                base.add_usage(usage, call_cost)
        rest = [
            None if total is None else total - (part or 0)
            for total, part in zip((getattr(totals, b) for b in BUCKETS), base.buckets, strict=True)
        ]
        rest_cost = None if cost is None else cost - (base.cost or 0)
        rest_unpriced = unpriced - sum(n for *_, n in call_list)
        first = not call_list
        if first or rest_unpriced or any(rest) or rest_cost:
            cell = self.cell(job_key)
            cell.add_usage(Usage(*rest), rest_cost)
            cell.unpriced += rest_unpriced
            cell.executions += first

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

"""Budget admission within one claim transaction: lock the budgets, read their figures once,
reserve for each job admitted (the rules are described in :mod:`orchestrator.store.budgets`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from orchestrator.store.budgets import RESERVE, Action, Budget, Standing, load, standings
from orchestrator.store.spend import ClosedSpend
from shared.limits import MAX_COUNTER, MAX_MONEY


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a job may not be offered now, and what its budget's action is."""

    action: Action
    reason: str
    retry_at: datetime | None  # the period's reset, for a held job


@dataclass(slots=True)
class Admission:
    """Budget decisions within one claim transaction: the budgets are locked and their
    figures read once, the first time a candidate job matches one; reservations are added
    as jobs are admitted."""

    conn: asyncpg.Connection
    now: datetime
    closed: ClosedSpend | None = None
    budgets: list[Budget] | None = None
    standings: dict[str, Standing] | None = None
    reservations: list[tuple[str, str, Decimal, int | None]] = field(default_factory=list)

    async def cover(self, labels: list[dict[str, str]]) -> None:
        """Lock every budget and read their figures, once, if any of these jobs match one.

        Closed hours are never summed here (a first sum can be slow, and a claim runs under a
        deadline): a budget whose sum is not ready is ``loading`` and its jobs wait."""
        if self.standings is not None:
            return
        if self.budgets is None:
            self.budgets = await load(self.conn)
        if not any(b.matches(lb) for b in self.budgets for lb in labels):
            return
        self.budgets = await load(self.conn, lock=True)
        self.standings = await standings(
            self.conn, self.budgets, self.now, self.closed, advance=self.closed is None
        )

    def admit(
        self,
        execution_id: str,
        labels: dict[str, str],
        limits: dict[str, Any],
        allows_unpriced: bool,
    ) -> Refusal | dict[str, Any]:
        """Reserve for one job against every matching budget and return its capped limits,
        or the refusal of the first budget without room (call :meth:`cover` first)."""
        matching = [s for s in (self.standings or {}).values() if s.budget.matches(labels)]
        if not matching:
            return limits
        for s in matching:
            if s.budget.problem is not None:
                return Refusal("hold", s.describe(), None)
            if s.loading:
                # Looked at again at the recheck, or as soon as the warm-up has the sum.
                return Refusal("hold", s.describe(), None)
        own = limits.get("budgetUsd")
        usd = (
            Decimal(str(own))
            if own is not None
            else min(s.budget.default_reservation_usd for s in matching)
        )
        usd = min(usd, Decimal(str(MAX_MONEY)))
        for s in matching:
            b = s.budget
            if b.refuse_unpriced and allows_unpriced:
                return Refusal(b.action, f"budget {b.name}: refuses jobs on unpriced models", None)
            if s.room_usd < usd:
                return Refusal(b.action, s.describe(), s.reset)
        counted = [s for s in matching if s.budget.limit_tokens is not None]
        own_tokens: int | None = limits.get("maxTotalTokens")
        tokens = own_tokens
        if counted:
            if tokens is None:
                # What each budget allows: its default token reservation, else its room.
                tokens = min(
                    s.budget.default_reservation_tokens or max(s.room_tokens or 0, 0)
                    for s in counted
                )
            tokens = min(tokens, MAX_COUNTER)
            for s in counted:
                room = s.room_tokens or 0
                # A job's own maxTotalTokens 0 is respected (it stops before its first call).
                if room < tokens or (tokens == 0 and own_tokens is None):
                    return Refusal(s.budget.action, s.describe(), s.reset)
        capped = {**limits, "budgetUsd": float(usd)}
        if tokens is not None:
            capped["maxTotalTokens"] = tokens
        for s in matching:
            s.reserved_usd += usd
            held_tokens = tokens if s.budget.limit_tokens is not None else None
            s.reserved_tokens += held_tokens or 0
            self.reservations.append((s.budget.name, execution_id, usd, held_tokens))
        return capped

    async def record(self) -> None:
        """Write the reservations of the jobs admitted (after their executions exist)."""
        if self.reservations:
            await self.conn.execute(RESERVE, *map(list, zip(*self.reservations, strict=True)))

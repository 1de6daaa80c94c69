"""The budgets' Prometheus gauges, read from the standings the upkeep refreshes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class BudgetCollector(Collector):
    """The budgets' gauges, from the snapshot the upkeep refreshes (every orchestrator reads
    the same database: aggregate them with max by (budget))."""

    def __init__(self, snapshot: Callable[[], list[Any]], cap: Callable[[str], str]) -> None:
        self._snapshot = snapshot
        self._cap = cap

    def collect(self) -> Iterable[GaugeMetricFamily]:
        standings = self._snapshot()
        families = {
            "limit_usd": GaugeMetricFamily(
                "tally_budget_limit_usd", "A budget's limit (USD).", labels=["budget"]
            ),
            "spent_usd": GaugeMetricFamily(
                "tally_budget_spent_usd",
                "A budget's spend in its current period (USD, priced calls).",
                labels=["budget"],
            ),
            "reserved_usd": GaugeMetricFamily(
                "tally_budget_reserved_usd",
                "Reserved by a budget's running jobs and not spent yet (USD).",
                labels=["budget"],
            ),
            "soft_ratio": GaugeMetricFamily(
                "tally_budget_soft_ratio",
                "A budget's soft threshold, a fraction of its limit (alerts).",
                labels=["budget"],
            ),
            "held": GaugeMetricFamily(
                "tally_budget_held_jobs", "Queued jobs a budget holds.", labels=["budget"]
            ),
            "unpriced": GaugeMetricFamily(
                "tally_budget_unpriced_calls",
                "Calls without a price in a budget's period (counted in tokens, not USD).",
                labels=["budget"],
            ),
            "limit_tokens": GaugeMetricFamily(
                "tally_budget_limit_tokens", "A budget's token limit.", labels=["budget"]
            ),
            "spent_tokens": GaugeMetricFamily(
                "tally_budget_spent_tokens",
                "Tokens spent in a budget's current period.",
                labels=["budget"],
            ),
        }
        for s in standings:
            name = [self._cap(s.budget.name)]
            if s.budget.problem is not None or s.loading:
                # A row that cannot be enforced, or whose closed hours are still being summed,
                # has no figures (a gap, never a zero); its held jobs still count.
                families["held"].add_metric(name, s.held)
                continue
            families["limit_usd"].add_metric(name, float(s.budget.limit_usd))
            families["spent_usd"].add_metric(name, float(s.spent_usd))
            families["reserved_usd"].add_metric(name, float(s.reserved_usd))
            families["soft_ratio"].add_metric(name, float(s.budget.soft_ratio))
            families["held"].add_metric(name, s.held)
            families["unpriced"].add_metric(name, s.unpriced_calls)
            families["spent_tokens"].add_metric(name, s.spent_tokens)
            if s.budget.limit_tokens is not None:
                families["limit_tokens"].add_metric(name, s.budget.limit_tokens)
        yield from families.values()

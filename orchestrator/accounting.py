"""The accounting rule, pure: what a result makes an execution's totals, and what it counts.

Counters equal the ledger by construction. When a call is first recorded its usage is counted
under its (provider, model). When the result arrives, the execution's totals become what the
result says (per bucket: the result's own total, else the sum of its ``modelUsage`` entries,
else the sum of the recorded calls), never less than the recorded calls. What the counters
still lack is exactly ``totals - calls``; that difference is spread over the result's
per-model entries, each taking at most what it reports beyond its own model's recorded calls,
and whatever no entry claims goes to the job's model. So the counters of an execution add up
to its row in ``executions`` whatever the mix of calls, entries and totals, even when a call's
model differs from the entry's (the Claude Agent SDK reports the aggregate under the requested
model and its steps under the model the API answered with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from shared import protocol as p
from shared.usage import BUCKETS, Usage, entry_cost, money


# Usage newly recorded, per (provider, model): input, output, cache read, cache creation,
# reasoning, cost. What the metrics add after the commit; summed here so that a batch of
# thousands of results costs the metrics one increment per series.
class Sums:
    """Usage and cost newly recorded for one (provider, model) in a batch."""

    __slots__ = ("cache_creation", "cache_read", "cost", "input", "output", "reasoning")

    def __init__(self) -> None:
        self.input = 0
        self.output = 0
        self.cache_read = 0
        self.cache_creation = 0
        self.reasoning = 0
        self.cost = 0.0

    def tokens(self) -> dict[str, int]:
        """The token buckets by name (shared.usage.BUCKETS)."""
        return {b: getattr(self, b) for b in BUCKETS}

    def __bool__(self) -> bool:
        return bool(
            self.input
            or self.output
            or self.cache_read
            or self.cache_creation
            or self.reasoning
            or self.cost
        )

    def add(self, other: Sums) -> None:
        """Add another batch's sums for the same series."""
        self.input += other.input
        self.output += other.output
        self.cache_read += other.cache_read
        self.cache_creation += other.cache_creation
        self.reasoning += other.reasoning
        self.cost += other.cost


Counted = dict[tuple[str, str], Sums]

Verdict = Literal["recorded", "duplicate", "not_assigned", "refused"]


@dataclass(slots=True)
class NewCall:
    """A call recorded for the first time (for the per-call metrics)."""

    provider: str
    model: str
    finish_reason: str
    duration_ms: float | None
    usage: Usage
    unavailable: bool
    priced: bool = True
    # The provider's usage contradicted itself (job:generation usageInconsistent).
    inconsistent: bool = False


@dataclass(slots=True)
class FinishedJob:
    """A job that reached a terminal status in this batch."""

    job_id: str
    executor: str
    status: p.JobState
    duration_seconds: float | None


@dataclass(slots=True)
class BatchOutcome:
    """Per-frame verdicts (index-aligned with the input) and what the metrics must add."""

    verdicts: list[Verdict]
    counted: Counted = field(default_factory=dict)
    new_calls: list[NewCall] = field(default_factory=list)
    finished_jobs: list[FinishedJob] = field(default_factory=list)
    inconsistent: int = 0
    freed_executions: list[str] = field(default_factory=list)
    # Tool calls newly recorded: (tool name, error, duration in ms).
    new_tools: list[tuple[str, bool, float]] = field(default_factory=list)
    # Usage events to log once the batch committed (only when they are asked for).
    events: list[dict[str, Any]] = field(default_factory=list)


def count(counted: Counted, provider: str, model: str, usage: Usage, cost: float) -> None:
    """Add one usage to the batch's per-(provider, model) sums (unknown buckets add nothing)."""
    sums = counted.get((provider, model))
    if sums is None:
        sums = counted[(provider, model)] = Sums()
    sums.input += usage.input or 0
    sums.output += usage.output or 0
    sums.cache_read += usage.cache_read or 0
    sums.cache_creation += usage.cache_creation or 0
    sums.reasoning += usage.reasoning or 0
    sums.cost += cost


def merge_counted(into: Counted, other: Counted) -> None:
    """Add another batch's sums."""
    for key, sums in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = mine = Sums()
        mine.add(sums)


@dataclass(frozen=True, slots=True)
class CallSums:
    """An execution's recorded calls of one model, summed (already counted when recorded)."""

    model: str
    usage: Usage
    cost: Decimal | None


@dataclass(slots=True)
class Settlement:
    """An execution's totals once its result is recorded (treat as immutable: not frozen only
    because a frozen dataclass costs several times as much to build, once per result)."""

    totals: Usage
    cost: float | Decimal | None
    inconsistent: bool


def _vector(u: Usage) -> list[int]:
    return [u.input or 0, u.output or 0, u.cache_read or 0, u.cache_creation or 0, u.reasoning or 0]


def settle_result(
    counted: Counted,
    payload: p.ResultPayload,
    calls: Sequence[CallSums],
    provider_default: str,
    fallback_model: str,
) -> Settlement:
    """Settle one result: its execution's totals and cost; adds what it counts to ``counted``.

    ``calls`` are the execution's recorded calls per model (empty when it reported none).
    Money stays the decimal the sender wrote (a float's shortest repr) so NUMERIC sums exact.
    """
    entries = payload.model_usage if isinstance(payload.model_usage, list) else None
    if not calls:
        quick = _settle_covered(counted, payload, entries, provider_default, fallback_model)
        if quick is not None:
            return quick
    return _settle_general(counted, payload, entries, calls, provider_default, fallback_model)


def _settle_covered(
    counted: Counted,
    payload: p.ResultPayload,
    entries: list[p.ModelUsage] | None,
    provider_default: str,
    fallback_model: str,
) -> Settlement | None:
    """The common case in one pass: no recorded calls, and totals at least their entries.

    Returns None when the totals fall below the entries; the general rule then caps them.
    """
    sent = Usage.from_struct(payload)
    cost_sent = payload.cost_usd if isinstance(payload.cost_usd, float | int) else None
    if not entries:
        if not sent.is_unknown or (cost_sent or 0.0) > 0:
            count(counted, provider_default, fallback_model, sent, cost_sent or 0.0)
        return Settlement(sent, cost_sent, False)
    inp = out = read = creation = 0
    reasoning: int | None = None
    entries_cost = 0.0
    for e in entries:
        if e.unreported:
            return None  # unknown fields in the entries: the general rule keeps them unknown
        inp += e.input_tokens
        out += e.output_tokens
        read += e.cache_read_input_tokens
        creation += e.cache_creation_input_tokens
        r = e.reasoning_tokens
        if r is not p.UNSET:
            reasoning = r if reasoning is None else reasoning + r
        entries_cost += e.cost_usd
    t_in = inp if sent.input is None else sent.input
    t_out = out if sent.output is None else sent.output
    t_read = read if sent.cache_read is None else sent.cache_read
    t_creation = creation if sent.cache_creation is None else sent.cache_creation
    t_reasoning = reasoning if sent.reasoning is None else sent.reasoning
    t_cost = entries_cost if cost_sent is None else cost_sent
    if (
        t_in < inp
        or t_out < out
        or t_read < read
        or t_creation < creation
        or (t_reasoning or 0) < (reasoning or 0)
        or t_cost < entries_cost - 1e-12 * max(1.0, entries_cost)
    ):
        return None
    for e in entries:
        provider = e.provider if isinstance(e.provider, str) else provider_default
        sums = counted.get((provider, e.model))
        if sums is None:
            sums = counted[(provider, e.model)] = Sums()
        sums.input += e.input_tokens
        sums.output += e.output_tokens
        sums.cache_read += e.cache_read_input_tokens
        sums.cache_creation += e.cache_creation_input_tokens
        r = e.reasoning_tokens
        sums.reasoning += r if type(r) is int else 0
        sums.cost += e.cost_usd
    totals = Usage(t_in, t_out, t_read, t_creation, t_reasoning)
    rest = [t_in - inp, t_out - out, t_read - read, t_creation - creation]
    rest.append((t_reasoning or 0) - (reasoning or 0))
    rest_cost = t_cost - entries_cost
    if any(rest) or rest_cost > 1e-12:
        count(counted, provider_default, fallback_model, Usage(*rest), max(0.0, rest_cost))
    if cost_sent is not None:
        cost_exact: float | Decimal | None = cost_sent
    else:
        cost_exact = sum((money(e.cost_usd) for e in entries), Decimal(0))
    consistent = (t_in == inp and t_out == out and t_read == read and t_creation == creation) and (
        cost_sent is None or _same_money(cost_sent, entries_cost)
    )
    return Settlement(totals, cost_exact, not consistent)


def _settle_general(
    counted: Counted,
    payload: p.ResultPayload,
    entries: list[p.ModelUsage] | None,
    calls: Sequence[CallSums],
    provider_default: str,
    fallback_model: str,
) -> Settlement:
    """The rule for every result; see the module's docstring."""
    sent = Usage.from_struct(payload)
    entry_usages = [Usage.from_entry(e) for e in entries] if entries else []
    entry_costs = [entry_cost(e) for e in entries] if entries else []
    known_entry_costs = [c for c in entry_costs if c is not None]
    entry_sum = Usage.sum(entry_usages)
    calls_usage = Usage.sum(c.usage for c in calls)
    inconsistent = False
    totals: list[int | None] = []
    for b in BUCKETS:
        value = next(
            (
                v
                for v in (getattr(sent, b), getattr(entry_sum, b), getattr(calls_usage, b))
                if v is not None
            ),
            None,
        )
        called = getattr(calls_usage, b)
        if value is not None and called is not None and value < called:
            value, inconsistent = called, True  # the recorded calls were spent whatever it says
        totals.append(value)
    total_usage = Usage(*totals)

    cost_sent = payload.cost_usd if isinstance(payload.cost_usd, float | int) else None
    call_costs = [c.cost for c in calls if c.cost is not None]
    calls_cost = sum(call_costs, Decimal(0))
    cost_exact: float | Decimal | None
    if cost_sent is not None:
        cost_exact = cost_sent
    elif known_entry_costs:
        cost_exact = sum((money(c) for c in known_entry_costs), Decimal(0))
    elif call_costs:
        cost_exact = calls_cost
    else:
        cost_exact = None  # unpriced: unknown, never $0
    if cost_exact is not None and call_costs and money(float(cost_exact)) < calls_cost:
        cost_exact, inconsistent = calls_cost, True

    if entries:
        entries_cost = sum(known_entry_costs)
        if any(
            getattr(sent, b) is not None
            and getattr(entry_sum, b) is not None
            and getattr(sent, b) != getattr(entry_sum, b)
            for b in ("input", "output", "cache_read", "cache_creation")
        ) or (
            cost_sent is not None
            and len(known_entry_costs) == len(entries)
            and not _same_money(cost_sent, entries_cost)
        ):
            inconsistent = True

    # What the counters still lack: the totals beyond the already counted calls.
    remaining = [t - c for t, c in zip(_vector(total_usage), _vector(calls_usage), strict=True)]
    remaining_cost = float(cost_exact or 0) - float(calls_cost)
    by_model: dict[str, list[int]] = {}
    cost_by_model: dict[str, float] = {}
    for c in calls:
        vec = by_model.setdefault(c.model, [0, 0, 0, 0, 0])
        for i, v in enumerate(_vector(c.usage)):
            vec[i] += v
        cost_by_model[c.model] = cost_by_model.get(c.model, 0.0) + float(c.cost or 0)
    for e, reported, e_cost in zip(entries or (), entry_usages, entry_costs, strict=True):
        already = by_model.get(e.model, [0, 0, 0, 0, 0])
        take = []
        for i, v in enumerate(_vector(reported)):
            share = min(max(0, v - already[i]), remaining[i])
            remaining[i] -= share
            take.append(share)
        e_cost_value = e_cost or 0.0
        cost_share = min(max(0.0, e_cost_value - cost_by_model.get(e.model, 0.0)), remaining_cost)
        cost_share = max(0.0, cost_share)
        remaining_cost -= cost_share
        if any(take) or cost_share > 0:
            provider = e.provider if isinstance(e.provider, str) else provider_default
            count(counted, provider, e.model, Usage(*take), cost_share)
    if any(remaining) or remaining_cost > 1e-12:
        count(
            counted,
            provider_default,
            fallback_model,
            Usage(*remaining),
            max(0.0, remaining_cost),
        )
    return Settlement(total_usage, cost_exact, inconsistent)


def unpriced_calls_of(
    eid: str, counted: dict[str, int], cost: float | Decimal | None, totals: Usage
) -> int:
    """Calls of an execution without a price: its recorded calls with no cost; for a result
    without recorded calls whose usage is known but cost is not, that one result."""
    if eid in counted:
        return counted[eid]
    return 1 if cost is None and not totals.is_unknown else 0


def _same_money(sent: float, entries_cost: float) -> bool:
    return abs(sent - entries_cost) <= 1e-9 * max(1.0, sent)

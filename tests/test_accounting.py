"""The accounting rule, pure: an execution's counters always add up to its ledger totals."""

from __future__ import annotations

import math
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.accounting import CallSums, Counted, _settle_general, count, settle_result
from shared import protocol as p
from shared.usage import BUCKETS, Usage

ROW_PROVIDER, ROW_MODEL = "simulated", "sim-small"


def _entry(model: str, cost: float, **fields: int) -> p.ModelUsage:
    counts = {
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 4,
    }
    return p.ModelUsage(model=model, cost_usd=cost, **{**counts, **fields})


def _counted_calls(calls: list[CallSums]) -> Counted:
    """What the counters held before the result: each call counted when recorded."""
    counted: Counted = {}
    for c in calls:
        count(counted, "prov", c.model, c.usage, float(c.cost or 0))
    return counted


def _assert_counters_equal_totals(counted: Counted, totals: Usage, cost: object) -> None:
    for bucket in BUCKETS:
        counted_bucket = sum(getattr(s, bucket) for s in counted.values())
        assert counted_bucket == (getattr(totals, bucket) or 0), bucket
    assert math.isclose(
        sum(s.cost for s in counted.values()), float(cost or 0), rel_tol=1e-9, abs_tol=1e-9
    )


def test_fast_settlement_agrees_with_the_general_one() -> None:
    """Results without recorded calls take a one-pass path; it settles every result exactly
    as the general rule does with no calls: totals, cost, counted usage, inconsistency."""
    cases = [
        p.ResultPayload(success=True),
        p.ResultPayload(success=True, input_tokens=5, cost_usd=0.25),
        p.ResultPayload(success=True, model_usage=[]),
        p.ResultPayload(success=True, model_usage=[_entry("a", 0.1), _entry("b", 0.2)]),
        p.ResultPayload(
            success=True,
            input_tokens=2,
            output_tokens=4,
            cache_read_input_tokens=6,
            cache_creation_input_tokens=8,
            cost_usd=0.3,
            model_usage=[_entry("a", 0.1), _entry("b", 0.2)],
        ),
        p.ResultPayload(  # totals above the entries, reasoning only on the total
            success=True,
            input_tokens=50,
            reasoning_tokens=7,
            cost_usd=1.0,
            model_usage=[_entry("a", 0.1, reasoning_tokens=3), _entry("b", 0.2)],
        ),
        p.ResultPayload(  # totals below the entries
            success=True, output_tokens=1, model_usage=[_entry("a", 0.5, output_tokens=9)]
        ),
    ]
    for payload in cases:
        entries = payload.model_usage if isinstance(payload.model_usage, list) else None
        fast: Counted = {}
        general: Counted = {}
        a = settle_result(fast, payload, [], ROW_PROVIDER, ROW_MODEL)
        b = _settle_general(general, payload, entries, [], ROW_PROVIDER, ROW_MODEL)
        assert a.totals == b.totals, payload
        assert a.cost == b.cost, payload
        assert a.inconsistent == b.inconsistent, payload
        fast_nonzero = {k: v for k, v in fast.items() if v}
        general_nonzero = {k: v for k, v in general.items() if v}
        assert fast_nonzero.keys() == general_nonzero.keys(), payload
        for key, sums in general_nonzero.items():
            assert fast_nonzero[key].tokens() == sums.tokens(), payload
            assert abs(fast_nonzero[key].cost - sums.cost) < 1e-12, payload
        _assert_counters_equal_totals(fast, a.totals, a.cost)


def test_entry_under_another_model_than_the_calls_is_not_counted_twice() -> None:
    """The claude-agent case: steps recorded under the API's model, the result's aggregate
    under the requested model. The counters hold the totals once (1,000), not 2,000."""
    calls = [CallSums("claude-sonnet-4-6-20261001", Usage(1000, 0, 0, 0, None), Decimal("0.01"))]
    payload = p.ResultPayload(
        success=True,
        input_tokens=1000,
        cost_usd=0.01,
        model_usage=[
            p.ModelUsage(
                model="claude-sonnet-4-6",
                input_tokens=1000,
                output_tokens=0,
                cache_read_input_tokens=0,
                cache_creation_input_tokens=0,
                cost_usd=0.01,
            )
        ],
    )
    counted = _counted_calls(calls)
    settled = settle_result(counted, payload, calls, ROW_PROVIDER, ROW_MODEL)
    assert settled.totals.input == 1000
    _assert_counters_equal_totals(counted, settled.totals, settled.cost)


def test_totals_below_the_recorded_calls_are_raised_to_them() -> None:
    """Tokens of recorded calls were spent whatever a result says: the execution's totals are
    never less than its calls, and the result is flagged inconsistent."""
    calls = [CallSums("m", Usage(100, 50, None, None, None), Decimal("0.5"))]
    payload = p.ResultPayload(success=True, input_tokens=10, output_tokens=5, cost_usd=0.1)
    counted = _counted_calls(calls)
    settled = settle_result(counted, payload, calls, ROW_PROVIDER, ROW_MODEL)
    assert (settled.totals.input, settled.totals.output) == (100, 50)
    assert settled.cost == Decimal("0.5")
    assert settled.inconsistent
    _assert_counters_equal_totals(counted, settled.totals, settled.cost)


small = st.integers(0, 10_000)
opt_small = st.none() | small
models = st.sampled_from(["a", "b", "c"])
usages = st.builds(Usage, opt_small, opt_small, opt_small, opt_small, opt_small)
call_sums = st.lists(
    st.builds(
        CallSums,
        models,
        usages,
        st.none() | st.decimals(0, 10, places=4, allow_nan=False, allow_infinity=False),
    ),
    max_size=4,
    unique_by=lambda c: c.model,
)
entries = st.lists(
    st.builds(
        p.ModelUsage,
        model=models,
        input_tokens=small,
        output_tokens=small,
        cache_read_input_tokens=small,
        cache_creation_input_tokens=small,
        cost_usd=st.floats(0, 10, allow_nan=False),
        reasoning_tokens=st.just(p.UNSET) | small,
    ),
    max_size=3,
    unique_by=lambda e: e.model,
)
maybe_small = st.just(p.UNSET) | small


@given(
    calls=call_sums,
    model_usage=st.just(p.UNSET) | entries,
    totals=st.tuples(maybe_small, maybe_small, maybe_small, maybe_small, maybe_small),
    cost=st.just(p.UNSET) | st.floats(0, 10, allow_nan=False),
)
def test_counters_equal_the_totals_for_every_mix(
    calls: list[CallSums],
    model_usage: list[p.ModelUsage] | p.UnsetType,
    totals: tuple[int | p.UnsetType, ...],
    cost: float | p.UnsetType,
) -> None:
    """For any calls, per-model entries and totals, calls counted when recorded plus what the
    result counts equal the execution's totals bucket by bucket, and its cost."""
    payload = p.ResultPayload(
        success=True,
        input_tokens=totals[0],
        output_tokens=totals[1],
        cache_read_input_tokens=totals[2],
        cache_creation_input_tokens=totals[3],
        reasoning_tokens=totals[4],
        cost_usd=cost,
        model_usage=model_usage,
    )
    counted = _counted_calls(calls)
    settled = settle_result(counted, payload, calls, ROW_PROVIDER, ROW_MODEL)
    _assert_counters_equal_totals(counted, settled.totals, settled.cost)
    called = Usage.sum(c.usage for c in calls)
    for bucket in BUCKETS:
        if getattr(called, bucket) is not None:
            assert getattr(settled.totals, bucket) >= getattr(called, bucket)

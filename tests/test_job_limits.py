"""A job's limits bound the job across its attempts (issue 25, item 10): real PostgreSQL, a
real `tally serve` in process, a raw protocol daemon that reports spend and then a retryable
failure, as a provider refusing the next call (529) would make a real daemon do."""

from __future__ import annotations

import msgspec
import pytest

from orchestrator.client import TallyClient
from orchestrator.store.job_limits import Exhausted, Used, offer_limits, with_default_turns
from shared import protocol as p
from tests.conftest import scaled
from tests.invariants import _scrape_all
from tests.rawdaemon import RawDaemon
from tests.stack import CLIENT_TOKEN, fetch, http_url, running_service, submit_early, ws_url

LIMITS = p.Limits(
    budget_usd=0.5, max_turns=5, max_total_tokens=1000, max_output_tokens=400, timeout_ms=10_000
)


async def spend_then_fail(
    daemon: RawDaemon, offer: p.JobOffer, calls: list[tuple[int, int, float]], ms: float
) -> None:
    """Accept, report ``calls`` (input, output, cost), then a retryable failure."""
    await daemon.accept(offer)
    for seq, (inp, out, cost) in enumerate(calls):
        await daemon.send(
            p.JobGeneration(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.GenerationPayload(
                    seq=seq,
                    provider="simulated",
                    response_model="sim-small",
                    input_tokens=inp,
                    output_tokens=out,
                    cost_usd=cost,
                ),
            )
        )
    await daemon.send(
        p.JobResult(
            id=offer.id,
            timestamp=p.now_ms(),
            payload=p.ResultPayload(
                success=False,
                error_message="529 overloaded",
                error_class="retryable",
                duration_ms=ms,
                num_turns=len(calls),
                input_tokens=sum(c[0] for c in calls),
                output_tokens=sum(c[1] for c in calls),
                cost_usd=sum(c[2] for c in calls),
            ),
        )
    )
    while (await daemon.next_of(p.JobAck, timeout=scaled(10))).payload.of != "job:result":
        pass


async def test_a_retry_is_offered_what_earlier_attempts_left_then_the_job_is_decided(
    db_url: str,
) -> None:
    """Attempt 1 spends $0.30, 2 calls, 400 tokens (200 output) in 4 s and fails retryably:
    attempt 2 is offered $0.20, 3 turns, 600 tokens, 200 output tokens, 6 s. It spends the
    rest and fails again: attempt 3 is never offered, the job fails with stopReason budget,
    counted once."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d-retry", capacity=1)
        await daemon.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(
                client,
                [p.JobSpec(executor="simulated", limits=LIMITS, max_attempts=3)],
            )
        first = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert first.payload.limits == LIMITS
        await spend_then_fail(daemon, first, [(100, 100, 0.15), (100, 100, 0.15)], 4000)
        second = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert second.payload.attempt == 2
        got = second.payload.limits
        assert got.budget_usd == pytest.approx(0.2)
        assert (got.max_turns, got.max_total_tokens, got.max_output_tokens) == (3, 600, 200)
        assert 5900 <= got.timeout_ms <= 6000
        await spend_then_fail(daemon, second, [(100, 200, 0.2)], 1000)

        with pytest.raises(TimeoutError):
            await daemon.next_of(p.JobOffer, timeout=2.0)
        [row] = await fetch(
            db_url,
            "SELECT status, stop_reason, error, attempts, cost_usd, num_turns FROM jobs "
            "WHERE id = $1",
            job_id,
        )
        assert (row["status"], row["stop_reason"], row["attempts"]) == ("failed", "budget", 2)
        assert "used up by its 2 earlier attempt(s)" in row["error"]
        assert float(row["cost_usd"]) == pytest.approx(0.5) and row["num_turns"] == 3
        scraped = await _scrape_all([http_url(service, "/metrics")])
        failed = [v for lb, v in scraped["tally_jobs_total"] if lb["outcome"] == "failed"]
        assert sum(failed) == 1
        await daemon.close()


def test_limits_rules() -> None:
    """A first attempt gets the job's limits (maxTotalTokens 0 stays 0); a retry gets the
    rest, or Exhausted naming the limit; the default maxTurns goes only to an offer with none
    of maxTurns, budgetUsd and timeoutMs."""
    assert offer_limits({"maxTotalTokens": 0}, None) == {"maxTotalTokens": 0}
    assert offer_limits({}, None) == {}
    used = Used(turns=3, run_ms=999.4)
    found = offer_limits({"timeoutMs": 5000, "maxTurns": 3}, used)
    assert isinstance(found, Exhausted) and found.stop_reason == "max_turns"
    assert offer_limits({"timeoutMs": 5000, "maxTurns": 10}, used) == {
        "timeoutMs": 4000,
        "maxTurns": 7,
    }
    assert offer_limits({"maxTotalTokens": 2**60}, None) == {"maxTotalTokens": 2**53 - 1}
    assert with_default_turns({"maxTotalTokens": 0}, 100) == {"maxTotalTokens": 0, "maxTurns": 100}
    for own in ({"maxTurns": 3}, {"budgetUsd": 0.5}, {"timeoutMs": 1000}):
        assert with_default_turns(own, 100) == own
    assert with_default_turns({}, None) == {}


async def test_a_lost_attempts_run_time_ends_at_its_last_sign_of_life(db_url: str) -> None:
    """A daemon that accepts and dies at once, then restarts without it: its lost attempt's
    run time is not the lease timeout the reaper waited, so the retry is offered nearly all
    of timeoutMs 5000 (old: about 2 s less, and a longer lease failed the job with
    stopReason timeout)."""
    fast = {"lease_timeout": 2.0, "heartbeat_timeout": 1.0, "heartbeat_interval": 0.2}
    async with running_service(db_url, **fast) as service:
        first = RawDaemon(ws_url(service), "d-dies", capacity=1)
        await first.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            await submit_early(
                client,
                [p.JobSpec(executor="simulated", limits=p.Limits(timeout_ms=5000), max_attempts=2)],
            )
        offer = await first.next_of(p.JobOffer, timeout=scaled(10))
        await first.accept(offer)
        await first.close()
        second = RawDaemon(ws_url(service), "d-dies", capacity=1)  # restarted, runs nothing
        await second.connect()
        retry = await second.next_of(p.JobOffer, timeout=scaled(15))
        assert retry.payload.attempt == 2 and retry.payload.limits.timeout_ms >= 4500
        await second.accept(retry)
        await second.finish(retry)
        await second.close()


@pytest.mark.parametrize("accepted", [True, False], ids=["lost", "offer-timed-out"])
async def test_an_attempt_cut_off_counts_as_its_offered_budget_until_its_result(
    db_url: str, accepted: bool
) -> None:
    """A job's budgetUsd B across an attempt cut off (lost after accepting, or its accept
    lost so the offer timed out): the retry waits until the cut-off attempt's result arrives
    and is offered B less its final cost, so both together stay within B (old: the retry
    was offered B less what was reported so far, at once)."""
    fast = {"lease_timeout": 1.0, "heartbeat_timeout": 1.0, "heartbeat_interval": 0.2}
    async with running_service(db_url, offer_timeout=1.0, budget_recheck=0.2, **fast) as service:
        first = RawDaemon(ws_url(service), "d-cut", capacity=1)
        await first.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(
                client,
                [p.JobSpec(executor="simulated", limits=p.Limits(budget_usd=1.0), max_attempts=2)],
            )
        offer = await first.next_of(p.JobOffer, timeout=scaled(10))
        if accepted:
            await first.accept(offer)
            await first.send(
                p.JobGeneration(
                    id=offer.id,
                    timestamp=p.now_ms(),
                    payload=p.GenerationPayload(
                        seq=0, provider="simulated", response_model="sim-small",
                        input_tokens=10, output_tokens=10, cost_usd=0.2,
                    ),
                )
            )  # fmt: skip
            await first.next_of(p.JobAck, timeout=scaled(10))
        await first.close()
        second = RawDaemon(ws_url(service), "d-after", capacity=1)
        await second.connect()
        with pytest.raises(TimeoutError):
            await second.next_of(p.JobOffer, timeout=4.0)
        [row] = await fetch(db_url, "SELECT hold_reason FROM jobs WHERE id = $1", job_id)
        assert "waiting for the usage" in (row["hold_reason"] or ""), row
        first = RawDaemon(ws_url(service), "d-cut", executors=["nothing"], capacity=1)
        await first.connect()
        await first.send(
            p.JobResult(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.ResultPayload(
                    success=False, error_message="cut off", error_class="retryable",
                    input_tokens=10, output_tokens=10, cost_usd=0.3,
                ),
            )
        )  # fmt: skip
        retry = await second.next_of(p.JobOffer, timeout=scaled(15))
        assert retry.payload.job_id == job_id and retry.payload.attempt == 2
        assert retry.payload.limits.budget_usd == pytest.approx(0.7)
        await second.accept(retry)
        await second.finish(retry)
        await first.close()
        await second.close()


async def test_the_default_max_turns_goes_only_to_an_otherwise_unbounded_offer(
    db_url: str,
) -> None:
    """`--default-max-turns` is offered to a job with none of maxTurns, budgetUsd and
    timeoutMs, and not to a job with its own budgetUsd or timeoutMs (old: to every job
    without maxTurns)."""
    async with running_service(db_url, default_max_turns=7) as service:
        daemon = RawDaemon(ws_url(service), "d-default", capacity=1)
        await daemon.connect()
        for limits, turns in (
            (p.Limits(), 7),
            (p.Limits(budget_usd=0.5), None),
            (p.Limits(timeout_ms=60_000), None),
        ):
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                await submit_early(client, [p.JobSpec(executor="simulated", limits=limits)])
            offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
            got = offer.payload.limits.max_turns
            assert (None if got is msgspec.UNSET else got) == turns, limits
            await daemon.accept(offer)
            await daemon.finish(offer)
        await daemon.close()


async def test_an_attempt_with_calls_of_unknown_cost_counts_as_its_offered_budget(
    db_url: str,
) -> None:
    """Attempt 1 of a job with budgetUsd $0.50 reports a call whose cost is unknown
    (inconsistent usage on a priced model; its daemon counted it at its upper bound) and fails
    retryably: it counts as its whole offered budget, so no retry is offered and the job fails
    with stopReason budget, instead of a fresh $0.50 for attempt 2."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d-unknown-cost", capacity=1)
        await daemon.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(
                client,
                [p.JobSpec(executor="simulated", limits=p.Limits(budget_usd=0.5), max_attempts=3)],
            )
        first = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        await daemon.accept(first)
        await daemon.send(
            p.JobGeneration(
                id=first.id,
                timestamp=p.now_ms(),
                payload=p.GenerationPayload(
                    seq=0,
                    provider="openai",
                    response_model="gpt-4.1-mini",
                    output_tokens=1000,
                    usage_inconsistent=True,
                ),
            )
        )
        await daemon.send(
            p.JobResult(
                id=first.id,
                timestamp=p.now_ms(),
                payload=p.ResultPayload(
                    success=False,
                    error_message="529 overloaded",
                    error_class="retryable",
                    num_turns=1,
                    output_tokens=1000,
                ),
            )
        )
        while (await daemon.next_of(p.JobAck, timeout=scaled(10))).payload.of != "job:result":
            pass
        with pytest.raises(TimeoutError):
            await daemon.next_of(p.JobOffer, timeout=2.0)
        [row] = await fetch(
            db_url,
            "SELECT status, stop_reason, attempts, unpriced_calls FROM jobs WHERE id = $1",
            job_id,
        )
        assert (row["status"], row["stop_reason"], row["attempts"]) == ("failed", "budget", 1)
        assert row["unpriced_calls"] == 1
        await daemon.close()


async def test_a_lost_attempt_counts_as_its_offered_timeout_while_it_may_still_run(
    db_url: str,
) -> None:
    """A daemon that accepts a job with timeoutMs 5000 and is cut off (never comes back):
    its lost attempt may run up to its offered timeoutMs, so the retry on another daemon
    waits for its usage instead of being offered 5000 ms more at once (old: the lost
    attempt counted only its run time up to its last sign of life)."""
    fast = {"lease_timeout": 1.0, "heartbeat_timeout": 1.0, "heartbeat_interval": 0.2}
    async with running_service(db_url, budget_recheck=0.2, **fast) as service:
        first = RawDaemon(ws_url(service), "d-cut-off", capacity=1)
        await first.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(
                client,
                [p.JobSpec(executor="simulated", limits=p.Limits(timeout_ms=5000), max_attempts=2)],
            )
        offer = await first.next_of(p.JobOffer, timeout=scaled(10))
        await first.accept(offer)
        await first.close()
        second = RawDaemon(ws_url(service), "d-other", capacity=1)
        await second.connect()
        with pytest.raises(TimeoutError):
            await second.next_of(p.JobOffer, timeout=4.0)
        [row] = await fetch(db_url, "SELECT status, hold_reason FROM jobs WHERE id = $1", job_id)
        assert row["status"] == "queued", row
        assert "waiting for the usage" in (row["hold_reason"] or ""), row
        assert "timeout" in row["hold_reason"], row
        await second.close()

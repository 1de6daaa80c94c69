"""A job's limits bound the job across its attempts (issue 25, item 10): real PostgreSQL, a
real `tally serve` in process, a raw protocol daemon that reports spend and then a retryable
failure, as a provider refusing the next call (529) would make a real daemon do."""

from __future__ import annotations

import pytest

from orchestrator.client import TallyClient
from orchestrator.store.job_limits import Exhausted, Used, offer_limits
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
    """A first attempt gets the job's limits (and the default maxTurns only without its own;
    maxTotalTokens 0 stays 0); a retry gets the rest, or Exhausted naming the limit."""
    assert offer_limits({"maxTotalTokens": 0}, None, 100) == {"maxTotalTokens": 0, "maxTurns": 100}
    assert offer_limits({"maxTurns": 3}, None, 100) == {"maxTurns": 3}
    assert offer_limits({}, None, None) == {}
    used = Used(turns=3, run_ms=999.4)
    found = offer_limits({"timeoutMs": 5000}, used, 3)
    assert isinstance(found, Exhausted) and found.stop_reason == "max_turns"
    assert offer_limits({"timeoutMs": 5000}, used, 10) == {"timeoutMs": 4000, "maxTurns": 7}
    assert offer_limits({"maxTotalTokens": 2**60}, None) == {"maxTotalTokens": 2**53 - 1}

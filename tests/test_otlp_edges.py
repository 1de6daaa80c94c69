"""The OTLP export at its edges (issue 25, item 16), through a real orchestrator with its real
exporter, a raw protocol daemon and a real OTLP/HTTP receiver that decodes the bodies with
opentelemetry-proto: late usage of `rejected` and `lost` attempts, a call recorded after its
attempt's result, a collector's body limit, a collector that is down, and the metric streams
of two orchestrators when export leadership moves from one to the other.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.client import TallyClient
from orchestrator.config import OtlpSettings
from orchestrator.export.queue import EXPORTABLE
from orchestrator.export.spans import span_id
from orchestrator.service import Service
from shared import protocol as p
from tests.conftest import scaled
from tests.invariants import assert_invariants
from tests.otlp_receiver import Point, Receiver, Span
from tests.rawdaemon import RawDaemon
from tests.stack import CLIENT_TOKEN, fetch, running_service, wait_for, ws_url

pytestmark = pytest.mark.slow


def _otlp(receiver: Receiver, **overrides: Any) -> OtlpSettings:
    """Export settings for tests: quick polls and metric exports, short backoffs."""
    base: dict[str, Any] = {
        "endpoint": receiver.url,
        "poll_interval": 0.1,
        "metrics_interval": 0.3,
        "max_backoff": 0.5,
    }
    return OtlpSettings(**{**base, **overrides})


def _hex(n: int) -> str:
    return n.to_bytes(8, "big").hex()


def _ids(receiver: Receiver) -> list[str]:
    return [s.span_id for s in receiver.spans()]


def _root(receiver: Receiver, execution_id: str) -> list[Span]:
    """Every copy of an attempt's span the receiver got."""
    want = _hex(span_id(execution_id))
    return [s for s in receiver.spans() if s.span_id == want]


def _sample(service: Service, name: str) -> float:
    value = service.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def _streams(points: list[Point], metric: str) -> dict[tuple[Any, ...], Point]:
    """The latest point of each cumulative stream of ``metric``: per resource instance and
    attribute set."""
    latest: dict[tuple[Any, ...], Point] = {}
    for point in points:
        if point.metric != metric:
            continue
        key = (
            point.resource.get("service.instance.id"),
            tuple(sorted((k, str(v)) for k, v in point.attributes.items())),
        )
        if key not in latest or point.time >= latest[key].time:
            latest[key] = point
    return latest


def _metric_total(points: list[Point], metric: str, **match: str) -> float:
    """The sum over every stream of its latest cumulative value."""
    return sum(
        point.value
        for (_, attrs), point in _streams(points, metric).items()
        if all((k, v) in attrs for k, v in match.items())
    )


async def _ledger_calls(db_url: str) -> list[Any]:
    return await fetch(db_url, "SELECT * FROM llm_calls ORDER BY execution_id, seq")


def _check_metrics(calls: list[Any], points: list[Point]) -> None:
    """The OTLP metrics count every call of the ledger exactly once."""
    assert _metric_total(points, "tally.llm_calls") == len(calls)
    for bucket, column in (("input", "input_tokens"), ("output", "output_tokens")):
        want = sum(c[column] or 0 for c in calls)
        got = _metric_total(points, "tally.tokens", **{"tally.token.bucket": bucket})
        assert got == want, bucket


async def _backlog(db_url: str) -> int:
    """Attempts in the export's queue (rejected offers included, until marked)."""
    rows = await fetch(db_url, f"SELECT count(*) AS n FROM executions WHERE {EXPORTABLE}")
    return int(rows[0]["n"])


def _generation(execution_id: str, seq: int, tokens: int) -> p.JobGeneration:
    return p.JobGeneration(
        id=execution_id,
        timestamp=p.now_ms(),
        payload=p.GenerationPayload(
            seq=seq,
            provider="simulated",
            response_model="sim-small",
            input_tokens=tokens,
            output_tokens=tokens + 1,
        ),
    )


def _result(execution_id: str, tokens: int, **fields: Any) -> p.JobResult:
    payload = {"success": True, "input_tokens": tokens, "output_tokens": tokens + 1, **fields}
    return p.JobResult(id=execution_id, timestamp=p.now_ms(), payload=p.ResultPayload(**payload))


async def _acked(raw: RawDaemon, of: str, seq: int | None = None) -> None:
    """Wait for the ack of a call (``seq``) or of a result."""
    while True:
        ack = await raw.next_of(p.JobAck, timeout=scaled(10))
        if ack.payload.of == of and (seq is None or ack.payload.seq == seq):
            return


async def _run(raw: RawDaemon, calls: int, tokens: int = 10, **result: Any) -> str:
    """Take the next offer, report ``calls`` calls and a result; return the execution id."""
    offer = await raw.next_of(p.JobOffer, timeout=scaled(10))
    await raw.accept(offer)
    for seq in range(calls):
        await raw.send(_generation(offer.id, seq, tokens))
    await raw.send(_result(offer.id, tokens * calls, **result))
    await _acked(raw, "job:result")
    return str(offer.id)


@contextlib.asynccontextmanager
async def _daemon(service: Service, name: str, capacity: int = 2) -> AsyncIterator[RawDaemon]:
    raw = RawDaemon(ws_url(service), f"{name}-{uuid.uuid4().hex[:6]}", capacity=capacity)
    await raw.connect()
    try:
        yield raw
    finally:
        await raw.close()


async def test_a_call_recorded_after_its_result_is_exported_and_counted_once(
    db_url: str,
) -> None:
    """A call recorded after its attempt's result marks the attempt pending again: it is sent
    again under the same ids, and only the new call is added to the metrics."""
    receiver = Receiver()
    try:
        async with (
            running_service(db_url, otlp=_otlp(receiver)) as service,
            _daemon(service, "late-call") as raw,
            TallyClient(ws_url(service), CLIENT_TOKEN) as client,
        ):
            [job_id] = await client.submit([p.JobSpec(executor="simulated")])
            eid = await _run(raw, calls=1)
            await client.wait([job_id], timeout=scaled(10))

            async def first_export() -> bool:
                return _hex(span_id(eid, 0)) in _ids(receiver)

            await wait_for(first_export, scaled(15))
            await raw.send(_generation(eid, 1, 7))  # after the result: a late call
            await _acked(raw, "job:generation", 1)

            async def late_call_exported() -> bool:
                return _hex(span_id(eid, 1)) in _ids(receiver)

            await wait_for(late_call_exported, scaled(15))
            await wait_for(lambda: _no_backlog(db_url), scaled(10))
        # The attempt was sent again under the same ids, the late call under it.
        roots = _root(receiver, eid)
        assert len(roots) == 2 and len({(r.trace_id, r.parent_span_id) for r in roots}) == 1
        [late] = [s for s in receiver.spans() if s.span_id == _hex(span_id(eid, 1))]
        assert late.parent_span_id == roots[0].span_id
        assert late.attributes["gen_ai.usage.input_tokens"] == 7
        calls = await _ledger_calls(db_url)
        assert len(calls) == 2
        _check_metrics(calls, receiver.points())  # the first call counted once, not twice
    finally:
        receiver.close()


async def _no_backlog(db_url: str) -> bool:
    return await _backlog(db_url) == 0


async def test_late_usage_of_a_rejected_offer_is_exported_once(db_url: str) -> None:
    """An offer that timed out (`rejected`) but whose daemon ran it anyway and reported a call
    and a result is exported with that usage, once; a rejected offer without usage is not."""
    receiver = Receiver()
    try:
        async with (
            running_service(db_url, otlp=_otlp(receiver), offer_timeout=0.6) as service,
            _daemon(service, "rejected", capacity=1) as raw,
            TallyClient(ws_url(service), CLIENT_TOKEN) as client,
        ):
            [busy_job] = await client.submit([p.JobSpec(executor="simulated")])
            busy = await raw.next_of(p.JobOffer, timeout=scaled(10))
            reject = p.RejectPayload(reason="busy")
            await raw.send(p.JobReject(id=busy.id, timestamp=p.now_ms(), payload=reject))
            await _run(raw, calls=1)  # offered again, run this time
            await client.wait([busy_job], timeout=scaled(10))
            [job_id] = await client.submit([p.JobSpec(executor="simulated")])
            late = await raw.next_of(p.JobOffer, timeout=scaled(10))  # never accepted

            async def timed_out() -> bool:
                rows = await fetch(
                    db_url, "SELECT status FROM executions WHERE id = $1", uuid.UUID(late.id)
                )
                return bool(rows[0]["status"] == "rejected")

            await wait_for(timed_out, scaled(10))
            decider = await _run(raw, calls=1, tokens=3)  # the job's next attempt decides it
            await client.wait([job_id], timeout=scaled(10))
            # The timed-out offer ran anyway: its call and result arrive late.
            await raw.send(_generation(late.id, 0, 20))
            await raw.send(_result(late.id, 20))
            await _acked(raw, "job:result")

            async def exported() -> bool:
                ids = _ids(receiver)
                return _hex(span_id(late.id, 0)) in ids and _hex(span_id(decider, 0)) in ids

            await wait_for(exported, scaled(15))
            await wait_for(lambda: _no_backlog(db_url), scaled(10))
        [row] = await fetch(db_url, "SELECT * FROM executions WHERE id = $1", uuid.UUID(late.id))
        assert row["status"] == "rejected" and not row["otlp_pending"]
        # Sent when its call landed and again with its result, under the same ids.
        root = _root(receiver, late.id)[-1]
        assert root.attributes["tally.status"] == "rejected"
        assert root.attributes["gen_ai.usage.output_tokens"] == row["output_tokens"] == 21
        assert root.trace_id == uuid.UUID(job_id).hex
        calls = await _ledger_calls(db_url)
        assert len(calls) == 3
        _check_metrics(calls, receiver.points())  # each call once
        # The offer rejected as busy never ran: not exported, and out of the queue.
        [declined] = await fetch(
            db_url, "SELECT * FROM executions WHERE id = $1", uuid.UUID(busy.id)
        )
        assert declined["status"] == "rejected" and not declined["otlp_pending"]
        assert not _root(receiver, busy.id)
        assert len({s.span_id for s in receiver.spans() if s.parent_span_id == ""}) == 3
    finally:
        receiver.close()


async def test_late_usage_of_a_lost_attempt_is_exported_once(db_url: str) -> None:
    """A `lost` attempt is exported when reaped; the call and result its daemon reports after
    coming back re-send it under the same ids, and only the new call is counted."""
    receiver = Receiver()
    try:
        async with (
            running_service(
                db_url,
                otlp=_otlp(receiver),
                heartbeat_timeout=0.8,
                lease_timeout=1.0,
            ) as service,
            TallyClient(ws_url(service), CLIENT_TOKEN) as client,
        ):
            daemon_id = f"lost-{uuid.uuid4().hex[:6]}"
            raw = RawDaemon(ws_url(service), daemon_id, capacity=1)
            await raw.connect()
            [job_id] = await client.submit([p.JobSpec(executor="simulated", max_attempts=2)])
            offer = await raw.next_of(p.JobOffer, timeout=scaled(10))
            await raw.accept(offer)
            await raw.send(_generation(offer.id, 0, 5))
            await _acked(raw, "job:generation", 0)
            await raw.close()  # gone past its lease

            async def lost_and_exported() -> bool:
                return len(_root(receiver, offer.id)) >= 1

            await wait_for(lost_and_exported, scaled(15))
            lost = _root(receiver, offer.id)[0]
            assert lost.attributes["tally.status"] == "lost"
            back = RawDaemon(ws_url(service), daemon_id, capacity=1)
            await back.connect()
            try:
                await back.send(_generation(offer.id, 1, 6))
                await back.send(_result(offer.id, 11, output_tokens=13))
                await _acked(back, "job:result")
                await _run(back, calls=1, tokens=2)  # the second attempt decides the job
                await client.wait([job_id], timeout=scaled(10))

                async def late_exported() -> bool:
                    return _hex(span_id(offer.id, 1)) in _ids(receiver)

                await wait_for(late_exported, scaled(15))
                await wait_for(lambda: _no_backlog(db_url), scaled(10))
            finally:
                await back.close()
        roots = _root(receiver, offer.id)
        assert len(roots) >= 2 and roots[-1].attributes["tally.status"] == "lost"
        assert roots[-1].attributes["gen_ai.usage.output_tokens"] == 13
        calls = await _ledger_calls(db_url)
        assert len(calls) == 3
        _check_metrics(calls, receiver.points())
    finally:
        receiver.close()


# A /v1/traces body over this is refused 413: an attempt with one call fits (about 1.1 KB),
# a batch of them does not, nor an attempt with 40 calls (about 18 KB), nor the span of an
# attempt whose error is 6,000 characters long.
BODY_LIMIT = 4000


async def test_a_batch_over_the_collector_body_limit_is_split_never_blocks(db_url: str) -> None:
    """Batches over a collector's body limit (413) are split until they fit, an attempt too
    big alone goes in pieces, a span too big alone is dropped and counted, and the attempts
    decided after them are exported all the same."""
    receiver = Receiver(max_trace_body=BODY_LIMIT)
    try:
        async with running_service(db_url, otlp=_otlp(receiver, batch=64)) as service:
            async with (
                _daemon(service, "limit", capacity=1) as raw,
                TallyClient(ws_url(service), CLIENT_TOKEN) as client,
            ):
                jobs = [p.JobSpec(executor="simulated", max_attempts=1) for _ in range(10)]
                ids = await client.submit(jobs)
                small = [await _run(raw, calls=1) for _ in range(4)]
                big = await _run(raw, calls=40)
                huge_error = await _run(
                    raw, calls=1, success=False, error_message="e" * 6000, error_class="permanent"
                )
                after = [await _run(raw, calls=1) for _ in range(4)]
                await client.wait(ids, timeout=scaled(20))
                want = {_hex(span_id(e)) for e in [*small, big, *after]}
                want |= {_hex(span_id(e, 0)) for e in [*small, huge_error, *after]}
                want |= {_hex(span_id(big, seq)) for seq in range(40)}

                async def all_but_the_huge_span() -> bool:
                    return want <= set(_ids(receiver))

                await wait_for(all_but_the_huge_span, scaled(30))
                await wait_for(lambda: _no_backlog(db_url), scaled(10))
                assert _sample(service, "tally_otlp_dropped_spans_total") == 1
                assert _sample(service, "tally_otlp_refused_requests_total") >= 3
        assert receiver.received.too_large >= 3
        assert not _root(receiver, huge_error)  # refused even alone: dropped
        calls = await _ledger_calls(db_url)
        assert len(calls) == 4 + 40 + 1 + 4
        _check_metrics(calls, receiver.points())  # the metrics miss nothing
    finally:
        receiver.close()


async def test_a_collector_that_is_down_is_retried_nothing_dropped(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the collector answers 503 the export backs off and drops nothing; once it is
    back every attempt reaches it."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    receiver = Receiver()
    receiver.unavailable = True
    try:
        async with (
            running_service(db_url, otlp=_otlp(receiver)) as service,
            _daemon(service, "down") as raw,
            TallyClient(ws_url(service), CLIENT_TOKEN) as client,
        ):
            ids = await client.submit([p.JobSpec(executor="simulated") for _ in range(3)])
            done = [await _run(raw, calls=2) for _ in range(3)]
            await client.wait(ids, timeout=scaled(10))

            async def refused_a_while() -> bool:
                return _sample(service, "tally_otlp_export_failures_total") >= 2

            await wait_for(refused_a_while, scaled(20))
            assert receiver.spans() == [] and await _backlog(db_url) == 3
            receiver.unavailable = False

            async def all_exported() -> bool:
                return {_hex(span_id(e)) for e in done} <= set(_ids(receiver))

            await wait_for(all_exported, scaled(20))
            await wait_for(lambda: _no_backlog(db_url), scaled(10))
            assert _sample(service, "tally_otlp_dropped_spans_total") == 0
            assert _sample(service, "tally_otlp_refused_requests_total") == 0
        assert receiver.received.unavailable >= 2
        _check_metrics(await _ledger_calls(db_url), receiver.points())
    finally:
        receiver.close()


async def test_export_leadership_moves_without_conflicting_or_double_counting(
    db_url: str,
) -> None:
    """Each orchestrator's metric streams carry its own service.instance.id; after the
    exporting one stops, the next exports what is left (a late call included) and its
    cumulative counters add only that: the streams' sum equals the ledger."""
    receiver = Receiver()
    otlp = _otlp(receiver)
    first = running_service(db_url, check_invariants=False, otlp=otlp, orchestrator_id="orch-a")
    a = await first.__aenter__()
    try:
        await wait_for(lambda: _leads(a), scaled(10))
        async with running_service(
            db_url, check_invariants=False, otlp=otlp, orchestrator_id="orch-b"
        ) as b:
            async with (
                _daemon(b, "moving") as raw,
                TallyClient(ws_url(b), CLIENT_TOKEN) as client,
            ):
                [job1] = await client.submit([p.JobSpec(executor="simulated")])
                e1 = await _run(raw, calls=1, tokens=4)
                await client.wait([job1], timeout=scaled(10))

                async def a_exported() -> bool:
                    return _hex(span_id(e1, 0)) in _ids(receiver)

                await wait_for(a_exported, scaled(15))
                assert _sample(b, "tally_otlp_exporting") == 0
                await first.__aexit__(None, None, None)  # the exporting orchestrator stops
                await wait_for(lambda: _leads(b), scaled(10))
                await raw.send(_generation(e1, 1, 9))  # late, after A exported e1
                await _acked(raw, "job:generation", 1)
                [job2] = await client.submit([p.JobSpec(executor="simulated")])
                e2 = await _run(raw, calls=1, tokens=6)
                await client.wait([job2], timeout=scaled(10))

                async def b_exported() -> bool:
                    ids = _ids(receiver)
                    return _hex(span_id(e1, 1)) in ids and _hex(span_id(e2, 0)) in ids

                await wait_for(b_exported, scaled(15))
                await wait_for(lambda: _no_backlog(db_url), scaled(10))
    except BaseException:
        with contextlib.suppress(Exception):
            await first.__aexit__(None, None, None)
        raise
    finally:
        receiver.close()
    await assert_invariants(db_url)
    points = receiver.points()
    spans = receiver.spans()
    by_instance = {s.resource.get("service.instance.id") for s in spans}
    assert by_instance == {"orch-a", "orch-b"}
    calls_streams = _streams(points, "tally.llm_calls")
    per_instance: dict[str, float] = {}
    for (instance, _), point in calls_streams.items():
        per_instance[instance] = per_instance.get(instance, 0) + point.value
    # A counted e1's first call; B only the late call and e2's: nothing re-added.
    assert per_instance == {"orch-a": 1, "orch-b": 2}
    # Each stream is one cumulative series: one start time per instance and attribute set.
    for key, _ in calls_streams.items():
        starts = {
            pt.start
            for pt in points
            if pt.metric == "tally.llm_calls"
            and pt.resource.get("service.instance.id") == key[0]
            and tuple(sorted((k, str(v)) for k, v in pt.attributes.items())) == key[1]
        }
        assert len(starts) == 1, key
    _check_metrics(await _ledger_calls(db_url), points)


async def _leads(service: Service) -> bool:
    return _sample(service, "tally_otlp_exporting") == 1


@pytest.mark.parametrize("status", [503, 429])
async def test_a_collector_pushing_back_is_retried_nothing_dropped(
    db_url: str, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """A collector that takes an empty request but answers 503 or 429 to spans (its memory
    limiter or queue full, a quota) is an outage, not a refusal: nothing split or dropped,
    the backlog kept in the ledger and exported once it recovers."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    receiver = Receiver()
    receiver.busy_status = status
    try:
        async with (
            running_service(db_url, otlp=_otlp(receiver)) as service,
            _daemon(service, "busy") as raw,
            TallyClient(ws_url(service), CLIENT_TOKEN) as client,
        ):
            ids = await client.submit([p.JobSpec(executor="simulated") for _ in range(3)])
            done = [await _run(raw, calls=2) for _ in range(3)]
            await client.wait(ids, timeout=scaled(10))

            async def pushed_back_a_while() -> bool:
                return _sample(service, "tally_otlp_export_failures_total") >= 2

            await wait_for(pushed_back_a_while, scaled(20))
            assert receiver.spans() == [] and await _backlog(db_url) == 3
            assert _sample(service, "tally_otlp_dropped_spans_total") == 0
            assert _sample(service, "tally_otlp_refused_requests_total") == 0
            receiver.busy_status = None

            async def all_exported() -> bool:
                return {_hex(span_id(e)) for e in done} <= set(_ids(receiver))

            await wait_for(all_exported, scaled(20))
            await wait_for(lambda: _no_backlog(db_url), scaled(10))
            assert _sample(service, "tally_otlp_dropped_spans_total") == 0
        assert receiver.received.pushed_back >= 2
        want = {_hex(span_id(e, seq)) for e in done for seq in range(2)}
        assert want <= set(_ids(receiver))  # every call's span, none dropped
        _check_metrics(await _ledger_calls(db_url), receiver.points())
    finally:
        receiver.close()


def test_an_inherited_service_instance_id_is_warned_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A service.instance.id from OTEL_RESOURCE_ATTRIBUTES (shared by every orchestrator it
    is set for) is logged as a warning at start; the orchestrator's own id is not."""
    from orchestrator.export.exporter import export_resource

    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    with caplog.at_level("WARNING", logger="orchestrator.export.exporter"):
        own = export_resource("orch-a")
    assert own.attributes["service.instance.id"] == "orch-a" and not caplog.records
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=everyone,team=x")
    with caplog.at_level("WARNING", logger="orchestrator.export.exporter"):
        shared = export_resource("orch-a")
    assert shared.attributes["service.instance.id"] == "everyone"
    [warning] = caplog.records
    assert "OTEL_RESOURCE_ATTRIBUTES" in warning.getMessage() and "everyone" in warning.getMessage()

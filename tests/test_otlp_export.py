"""`tally serve --otlp-endpoint`: the ledger exported over OTLP/HTTP with the GenAI semantic
conventions, checked against a real receiver that decodes the bodies with opentelemetry-proto.

Real `tally serve` and `tallyd` processes and PostgreSQL: one span per attempt and per call,
parents right, every token attribute equal to its ledger column and absent when unknown,
metric sums equal to the ledger's; after `kill -9` of the orchestrator every call the ledger
holds still reaches the receiver, under the same ids when sent twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import TallyClient
from orchestrator.export.spans import span_id
from shared import protocol as p
from shared.usage import Usage
from tests.conftest import scaled
from tests.invariants import assert_invariants
from tests.otlp_receiver import Point, Receiver, Span
from tests.rawdaemon import RawDaemon
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    free_port,
    listening,
    serve_process,
    start_daemon,
    stop_daemon_async,
    submit_early,
    wait_for,
)

pytestmark = pytest.mark.slow

DECIDED = "('succeeded', 'failed', 'lost', 'cancelled')"
ENV = {
    "OTEL_METRIC_EXPORT_INTERVAL": "500",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20otlp-secret",
}


def _hex(n: int) -> str:
    return n.to_bytes(8, "big").hex()


def _usage(row: Any) -> Usage:
    return Usage(
        row["input_tokens"],
        row["output_tokens"],
        row["cache_read_input_tokens"],
        row["cache_creation_input_tokens"],
        row["reasoning_tokens"],
    )


def _expected_tokens(usage: Usage) -> dict[str, int]:
    values = {
        "gen_ai.usage.input_tokens": usage.total_input,
        "gen_ai.usage.output_tokens": usage.output,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation,
        "gen_ai.usage.reasoning.output_tokens": usage.reasoning,
    }
    return {k: v for k, v in values.items() if v is not None}


def _by_id(spans: list[Span]) -> dict[str, Span]:
    """Spans by id; a span received twice must be the same span (same trace and parent)."""
    out: dict[str, Span] = {}
    for span in spans:
        seen = out.get(span.span_id)
        if seen is not None:
            assert (seen.trace_id, seen.parent_span_id, seen.name) == (
                span.trace_id,
                span.parent_span_id,
                span.name,
            ), f"span {span.span_id} received twice with different identities"
        out[span.span_id] = span
    return out


async def _ledger(db_url: str) -> tuple[list[Any], list[Any]]:
    attempts = await fetch(
        db_url,
        f"SELECT e.*, j.executor, j.labels FROM executions e JOIN jobs j ON j.id = e.job_id "
        f"WHERE e.status IN {DECIDED}",
    )
    calls = await fetch(
        db_url,
        "SELECT c.*, e.job_id FROM llm_calls c JOIN executions e ON e.id = c.execution_id",
    )
    return attempts, calls


async def _all_exported(db_url: str, receiver: Receiver) -> bool:
    attempts, calls = await _ledger(db_url)
    got = {s.span_id for s in receiver.spans()}
    want = {_hex(span_id(a["id"])) for a in attempts}
    want |= {_hex(span_id(c["execution_id"], c["seq"])) for c in calls}
    return bool(attempts) and want <= got


def _final_sums(points: list[Point], metric: str) -> dict[tuple[tuple[str, Any], ...], float]:
    """Per attribute set, the latest cumulative value of ``metric`` (one process's life)."""
    latest: dict[tuple[tuple[str, Any], ...], Point] = {}
    for point in points:
        if point.metric != metric:
            continue
        key = tuple(sorted((k, str(v)) for k, v in point.attributes.items()))
        if key not in latest or point.time >= latest[key].time:
            latest[key] = point
    return {k: v.value for k, v in latest.items()}


def _metric_total(points: list[Point], metric: str, **match: str) -> float:
    return sum(
        value
        for key, value in _final_sums(points, metric).items()
        if all((k, v) in key for k, v in match.items())
    )


def _check_spans(attempts: list[Any], calls: list[Any], spans: dict[str, Span]) -> None:
    calls_of: dict[str, list[Any]] = defaultdict(list)
    for call in calls:
        calls_of[str(call["execution_id"])].append(call)
    for a in attempts:
        eid = str(a["id"])
        root = spans[_hex(span_id(eid))]
        assert root.trace_id == uuid.UUID(str(a["job_id"])).hex
        assert root.parent_span_id == ""
        assert root.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert root.attributes["tally.attempt"] == a["attempt"]
        assert {k: v for k, v in root.attributes.items() if k.startswith("gen_ai.usage")} == (
            _expected_tokens(_usage(a))
        )
        # A failed attempt has error status (2), the others unset (0).
        assert root.status_code == (2 if a["status"] in ("failed", "lost") else 0)
        for label, value in json.loads(a["labels"] or "{}").items():
            assert root.attributes[f"tally.label.{label}"] == value
        children = [s for s in spans.values() if s.parent_span_id == root.span_id]
        assert len(children) == len(calls_of[eid])
        for c in calls_of[eid]:
            span = spans[_hex(span_id(eid, c["seq"]))]
            assert span.parent_span_id == root.span_id
            assert span.trace_id == root.trace_id
            usage_attrs = {k: v for k, v in span.attributes.items() if k.startswith("gen_ai.usage")}
            assert usage_attrs == _expected_tokens(_usage(c)), (eid, c["seq"])
            assert span.attributes.get("gen_ai.response.model") == c["response_model"]
            if c["cost_usd"] is None:
                assert "tally.cost.usd" not in span.attributes
            else:
                assert span.attributes["tally.cost.usd"] == pytest.approx(float(c["cost_usd"]))
            if c["duration_ms"] is not None:
                assert (span.end - span.start) / 1e6 == pytest.approx(c["duration_ms"], abs=0.01)
            assert span.start >= 0 and span.end >= span.start
            assert span.attributes["gen_ai.operation.name"] == "chat"
            assert span.kind == 3  # SPAN_KIND_CLIENT


def _check_metrics(calls: list[Any], points: list[Point]) -> None:
    usages = [_usage(c) for c in calls]
    want_input = sum(u.total_input for u in usages if u.total_input is not None)
    want_output = sum(u.output for u in usages if u.output is not None)
    tokens = "gen_ai.client.token.usage"
    assert _metric_total(points, tokens, **{"gen_ai.token.type": "input"}) == want_input
    assert _metric_total(points, tokens, **{"gen_ai.token.type": "output"}) == want_output
    for bucket, field in (("cache_read", "cache_read"), ("cache_creation", "cache_creation")):
        want = sum(getattr(u, field) or 0 for u in usages)
        got = _metric_total(points, "tally.tokens", **{"tally.token.bucket": bucket})
        assert got == want, bucket
    assert _metric_total(points, "tally.llm_calls") == len(calls)
    want_cost = sum(float(c["cost_usd"]) for c in calls if c["cost_usd"] is not None)
    assert _metric_total(points, "tally.cost") == pytest.approx(want_cost)
    # Required attributes on the GenAI metric.
    for point in points:
        if point.metric == tokens:
            assert {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.token.type"} <= (
                point.attributes.keys()
            )


async def _raw_job_with_unknown_buckets(url: str) -> None:
    """A daemon reporting a call with only its output known, twice (redelivered)."""
    raw = RawDaemon(url, "raw-otlp")
    await raw.connect()
    async with TallyClient(url, CLIENT_TOKEN) as client:
        [job_id] = await client.submit([p.JobSpec(executor="simulated", labels={"team": "raw"})])
        offer = await raw.next_of(p.JobOffer, timeout=scaled(10))
        await raw.accept(offer)
        generation = p.JobGeneration(
            id=offer.id,
            timestamp=p.now_ms(),
            payload=p.GenerationPayload(
                seq=0, provider="simulated", response_model="sim-small", output_tokens=9
            ),
        )
        for _ in range(2):
            await raw.send(generation)
        await raw.send(
            p.JobResult(id=offer.id, timestamp=p.now_ms(), payload=p.ResultPayload(success=True))
        )
        await client.wait([job_id], timeout=scaled(10))
    await raw.close()


async def test_spans_and_metrics_equal_the_ledger(db_url: str, tmp_path: Path) -> None:
    receiver = Receiver()
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    serve = serve_process(
        db_url, port, tmp_path / "serve.log", "--otlp-endpoint", receiver.url, env=ENV
    )
    try:
        await wait_for(lambda: listening(port), scaled(30))
        daemon = start_daemon(url, tmp_path / "d", log=tmp_path / "tallyd.log")
        try:
            async with TallyClient(url, CLIENT_TOKEN) as client:
                jobs = [
                    p.JobSpec(
                        executor="simulated",
                        model=model,
                        spec={
                            "prompt": f"job {i}",
                            "turns": 3,
                            "cachePrefixTokens": 400,
                            "reasoningTokens": 20 if model == "sim-reasoner" else 0,
                            "tools": ["current_time"],
                        },
                        labels={"team": "search"},
                    )
                    for i, model in enumerate(["sim-small", "sim-reasoner", "private-model"] * 3)
                ]
                jobs.append(
                    p.JobSpec(executor="simulated", max_attempts=1, spec={"turns": 2, "fail": True})
                )
                ids = await submit_early(client, jobs)
                await client.wait(ids, timeout=scaled(60))
        finally:
            await stop_daemon_async(daemon)
        await _raw_job_with_unknown_buckets(url)
        await wait_for(lambda: _all_exported(db_url, receiver), scaled(30), interval=0.2)
        await assert_invariants(db_url, f"http://127.0.0.1:{port}/metrics")
    finally:
        serve.send_signal(signal.SIGTERM)  # a graceful stop flushes the metrics
        serve.wait(30)
        receiver.close()
    attempts, calls = await _ledger(db_url)
    assert len(attempts) == 11 and len(calls) == 9 * 3 + 2 + 1
    spans = _by_id(receiver.spans())
    assert len(spans) == len(attempts) + len(calls)  # one span per attempt and per call
    _check_spans(attempts, calls, spans)
    # The unknown buckets of the raw call are absent, not 0.
    [raw_call] = [c for c in calls if c["input_tokens"] is None]
    raw_span = spans[_hex(span_id(raw_call["execution_id"], raw_call["seq"]))]
    assert "gen_ai.usage.input_tokens" not in raw_span.attributes
    assert raw_span.attributes["gen_ai.usage.output_tokens"] == 9
    _check_metrics(calls, receiver.points())
    # The SDK honoured OTEL_EXPORTER_OTLP_HEADERS on every request; the resource names Tally.
    assert all(h.get("authorization") == "Bearer otlp-secret" for h in receiver.received.headers)
    assert all(s.resource["service.name"] == "tally" for s in spans.values())


async def test_kill_9_mid_stream_every_call_reaches_the_receiver(
    db_url: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    log = tmp_path / "serve.log"
    args = ("--otlp-endpoint", receiver.url)
    serve = serve_process(db_url, port, log, *args, env=ENV)
    daemon = None
    try:
        await wait_for(lambda: listening(port), scaled(30))
        daemon = start_daemon(
            url, tmp_path / "d", "--max-concurrent-jobs", "4", log=tmp_path / "tallyd.log"
        )
        async with TallyClient(url, CLIENT_TOKEN) as client:
            jobs = [
                p.JobSpec(
                    executor="simulated",
                    spec={"prompt": f"k{i}", "turns": 3, "latencyMs": 150},
                )
                for i in range(40)
            ]
            await submit_early(client, jobs)

        async def some_exported() -> bool:
            return len(receiver.spans()) >= 10

        await wait_for(some_exported, scaled(30), interval=0.05)
        rows = await fetch(db_url, "SELECT count(*) AS n FROM jobs WHERE status = 'succeeded'")
        assert rows[0]["n"] < 40, "the stream had already settled: not mid-stream"
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(10)
        serve = serve_process(db_url, port, log, *args, env=ENV)

        async def all_done() -> bool:
            rows = await fetch(db_url, "SELECT count(*) AS n FROM jobs WHERE status = 'succeeded'")
            return bool(rows[0]["n"] == 40)

        await wait_for(all_done, scaled(90), interval=0.2)
        await wait_for(lambda: _all_exported(db_url, receiver), scaled(30), interval=0.2)
        await assert_invariants(db_url)
    finally:
        if daemon is not None:
            await stop_daemon_async(daemon)
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        receiver.close()
    _, calls = await _ledger(db_url)
    spans = _by_id(receiver.spans())  # any span received twice carries the same ids
    for call in calls:
        span = spans[_hex(span_id(call["execution_id"], call["seq"]))]
        assert span.parent_span_id == _hex(span_id(call["execution_id"]))
        assert span.attributes["gen_ai.usage.output_tokens"] == call["output_tokens"]
    assert len(calls) >= 40 * 3


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("ftp://collector:4318", "expected an http:// or https:// URL"),
        ("collector:4318", "expected an http:// or https:// URL"),
    ],
)
def test_bad_otlp_endpoint_is_refused(flag: str, message: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "serve", "--insecure", "--otlp-endpoint", flag],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "--otlp-endpoint" in out.stderr


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(test_spans_and_metrics_equal_the_ledger("", Path(".")))

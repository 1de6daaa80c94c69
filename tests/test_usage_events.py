"""`--log-format json`: every log record of `tally serve` and `tallyd` is one JSON object per
line (python-json-logger), and after each commit the orchestrator logs one `llm_call` per
recorded call and one `attempt_completed` per recorded result, in a shape pinned here. Run
end to end through real processes and PostgreSQL: the events' sums equal the ledger, unknown
buckets are absent, and a redelivered frame logs nothing twice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec import UNSET, Struct, UnsetType

from orchestrator.client import TallyClient
from shared import protocol as p
from tests.conftest import scaled
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


class _Event(Struct, forbid_unknown_fields=True, kw_only=True):
    timestamp: str
    level: str
    logger: str
    message: str
    event: str
    job_id: str
    execution_id: str
    attempt: int
    executor: str
    labels: dict[str, str]
    model: str
    input_tokens: int | UnsetType = UNSET
    output_tokens: int | UnsetType = UNSET
    cache_read_input_tokens: int | UnsetType = UNSET
    cache_creation_input_tokens: int | UnsetType = UNSET
    reasoning_tokens: int | UnsetType = UNSET
    cost_usd: float | UnsetType = UNSET
    cost_source: str | UnsetType = UNSET
    duration_ms: float | UnsetType = UNSET


class LlmCall(_Event, forbid_unknown_fields=True, kw_only=True):
    """The pinned shape of an ``llm_call`` event."""

    seq: int
    provider: str
    finish_reason: str | UnsetType = UNSET


class AttemptCompleted(_Event, forbid_unknown_fields=True, kw_only=True):
    """The pinned shape of an ``attempt_completed`` event."""

    status: str
    stop_reason: str | UnsetType = UNSET
    num_turns: int | UnsetType = UNSET
    error_class: str | UnsetType = UNSET


BUCKETS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)


def _sum(rows: list[Any], key: str) -> int | None:
    known = [r[key] for r in rows if r[key] is not None]
    return sum(known) if known else None


async def test_json_logs_and_usage_events_equal_the_ledger(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    log = tmp_path / "serve.log"
    serve = serve_process(db_url, port, log, "--log-format", "json")
    daemon_log = tmp_path / "tallyd.log"
    try:
        await wait_for(lambda: listening(port), scaled(30))
        daemon = start_daemon(
            url, tmp_path / "d", "--log-level", "info", "--log-format", "json", log=daemon_log
        )
        try:
            async with TallyClient(url, CLIENT_TOKEN) as client:
                jobs = [
                    p.JobSpec(
                        executor="simulated",
                        model=model,
                        spec={
                            "prompt": f"job {i}",
                            "turns": 3,
                            "cachePrefixTokens": 500,
                            "reasoningTokens": 20 if model == "sim-reasoner" else 0,
                            "tools": ["current_time"],
                        },
                        labels={"team": "search"},
                    )
                    for i, model in enumerate(["sim-small", "sim-reasoner", "private-model"] * 4)
                ]
                jobs.append(
                    p.JobSpec(executor="simulated", max_attempts=1, spec={"turns": 1, "fail": True})
                )
                ids = await submit_early(client, jobs)
                await client.wait(ids, timeout=scaled(60))
        finally:
            await stop_daemon_async(daemon)
        # A frame redelivered after the first was recorded: acknowledged, logged once.
        raw = RawDaemon(url, "raw-1")
        await raw.connect()
        async with TallyClient(url, CLIENT_TOKEN) as client:
            [job_id] = await client.submit([p.JobSpec(executor="simulated")])
            offer = await raw.next_of(p.JobOffer, timeout=scaled(10))
            await raw.accept(offer)
            for _ in range(2):
                await raw.finish(offer, tokens=7)
            await client.wait([job_id], timeout=scaled(10))
        await raw.close()
        await asyncio.sleep(0.5)  # the last batch's events are written after its commit
    finally:
        serve.terminate()
        serve.wait(30)
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message"} <= r.keys() for r in records)
    calls = [msgspec.convert(r, LlmCall) for r in records if r.get("event") == "llm_call"]
    attempts = [
        msgspec.convert(r, AttemptCompleted)
        for r in records
        if r.get("event") == "attempt_completed"
    ]
    ledger_calls = await fetch(db_url, "SELECT * FROM llm_calls")
    ledger_execs = await fetch(
        db_url, "SELECT * FROM executions WHERE result_recorded_at IS NOT NULL"
    )
    assert len(calls) == len(ledger_calls) and len(attempts) == len(ledger_execs)
    assert len({(c.execution_id, c.seq) for c in calls}) == len(calls)  # nothing twice
    for bucket in BUCKETS:
        logged = [getattr(c, bucket) for c in calls if getattr(c, bucket) is not UNSET]
        assert (sum(logged) if logged else None) == _sum(ledger_calls, bucket), bucket
        logged = [getattr(a, bucket) for a in attempts if getattr(a, bucket) is not UNSET]
        assert (sum(logged) if logged else None) == _sum(ledger_execs, bucket), bucket
    cost = sum(c.cost_usd for c in calls if c.cost_usd is not UNSET)
    assert cost == pytest.approx(float(sum(r["cost_usd"] or 0 for r in ledger_calls)))
    # Unknown stays unknown: the unpriced model's calls carry no cost, and a call whose
    # reasoning was not reported carries no reasoning_tokens.
    private = [c for c in calls if c.model == "private-model"]
    assert private and all(c.cost_usd is UNSET for c in private)
    assert all(c.reasoning_tokens is UNSET for c in calls if c.model == "sim-small")
    assert {a.status for a in attempts} == {"succeeded", "failed"}
    labelled = [c for c in calls if c.job_id in ids[:-1]]  # the last job has no labels
    assert len(labelled) == 36 and all(c.labels == {"team": "search"} for c in labelled)
    # tallyd's own records (info and up) are JSON lines too.
    daemon_records = [json.loads(line) for line in daemon_log.read_text().splitlines()]
    assert daemon_records and all(r["logger"].startswith("daemon.") for r in daemon_records)


def test_genai_histograms_carry_the_operation_name() -> None:
    """`gen_ai_operation_name`, which the GenAI conventions require, is on both histograms:
    `generate_content` for Gemini, `chat` for the others (read back by the real parser)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from orchestrator.accounting import BatchOutcome, NewCall
    from orchestrator.metrics import Metrics
    from shared.usage import Usage

    metrics = Metrics()
    outcome = BatchOutcome(verdicts=[])
    for provider in ("google", "openai", "anthropic"):
        outcome.new_calls.append(
            NewCall(provider, "m", "stop", 120.0, Usage(10, 5, 0, 0, None), False)
        )
    metrics.record_batch(outcome)
    text = generate_latest(metrics.registry).decode()
    seen = {
        (family.name, s.labels["gen_ai_provider_name"], s.labels["gen_ai_operation_name"])
        for family in text_string_to_metric_families(text)
        if family.name.startswith("gen_ai_")
        for s in family.samples
        if s.name.endswith("_count")
    }
    for name in ("gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds"):
        assert (name, "google", "generate_content") in seen
        assert (name, "openai", "chat") in seen and (name, "anthropic", "chat") in seen

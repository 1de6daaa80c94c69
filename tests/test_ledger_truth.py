"""Unknown stays unknown and unpriced is never $0, from the provider's wire to every report.

Real `tallyd` processes run the official SDKs against local servers speaking each provider's
wire format; a real `tally serve` records the frames in PostgreSQL; the test reads the
executions, the jobs, the `job:update` a client receives, `tally usage --format json` and
`/metrics`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import TallyClient
from shared import protocol as p
from tests.conftest import scaled
from tests.fakeprovider import FakeProvider, Scripted, serving
from tests.invariants import scrape_sync
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    http_url,
    running_service,
    start_daemon,
    submit_early,
    ws_url,
)
from tests.stack import stop_daemon_async as stop
from tests.test_executor_anthropic import message
from tests.test_executor_anthropic import usage as anthropic_usage
from tests.test_executor_ollama import done
from tests.test_executor_openai import RESPONSES_BODY, chat_usage, chunk, completion

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("ollama")


def _usage_json(db_url: str, by: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "usage",
            "--by",
            by,
            "--since",
            "1d",
            "--format",
            "json",
            "--database-url",
            db_url,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


async def _run_jobs(service: Any, specs: list[p.JobSpec]) -> dict[str, p.UpdatePayload]:
    async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
        ids = await submit_early(client, specs)
        finals = await client.wait(ids, timeout=scaled(60))
    return {job_id: finals[job_id] for job_id in ids}


async def test_openai_and_ollama_unknown_buckets_stay_unknown(db_url: str, tmp_path: Path) -> None:
    """OpenAI (chat, streamed chat, Responses) never reports cache writes and Ollama no cache
    at all: NULL in the calls, the executions, the jobs, absent from job:update and null in
    `tally usage --format json`; Anthropic's buckets stay exact numbers."""
    openai_provider = FakeProvider(
        [
            Scripted(body=completion(chat_usage(1200, 300, 1024, 200))),
            Scripted(
                events=[
                    chunk({"role": "assistant", "content": ""}),
                    chunk({"content": "hi"}, finish="stop"),
                    chunk({}, usage=chat_usage(50, 7, 32), choices=False),
                ]
            ),
            Scripted(body=RESPONSES_BODY),
        ]
    )
    ollama_provider = FakeProvider([Scripted(body=done(40, 9))])
    anthropic_provider = FakeProvider(
        [Scripted(body=message("end_turn", anthropic_usage(10, 20, read=300, write=400)))]
    )
    with (
        serving(openai_provider) as openai_url,
        serving(ollama_provider) as ollama_url,
        serving(anthropic_provider) as anthropic_url,
    ):
        async with running_service(db_url) as service:
            executors = {
                "openai": {"base_url": openai_url + "/v1", "api_key": "test"},
                "ollama": {"base_url": ollama_url},
                "anthropic": {"base_url": anthropic_url, "api_key": "test"},
            }
            extra = [
                a for n, c in executors.items() for a in ("--executor", f"{n}={json.dumps(c)}")
            ]
            daemon = start_daemon(ws_url(service), tmp_path / "d", *extra, concurrency=1)
            try:
                finals: dict[str, p.UpdatePayload] = {}
                for executor, model, spec in (
                    ("openai", "gpt-4.1-mini", {"prompt": "hi"}),
                    ("openai", "gpt-4.1-mini", {"prompt": "hi", "stream": True}),
                    ("openai", "gpt-4.1-mini", {"prompt": "hi", "api": "responses"}),
                    ("ollama", "llama3.2", {"prompt": "hi"}),
                    ("anthropic", "claude-sonnet-4-6", {"prompt": "hi"}),
                ):
                    finals.update(
                        await _run_jobs(
                            service, [p.JobSpec(executor=executor, model=model, spec=spec)]
                        )
                    )
                metrics = await asyncio.to_thread(scrape_sync, http_url(service, "/metrics"))
            finally:
                assert await stop(daemon) == 0
    jobs = await fetch(
        db_url,
        "SELECT id::text, executor, cache_read_input_tokens AS cr, "
        "cache_creation_input_tokens AS cc FROM jobs ORDER BY created_at",
    )
    executions = await fetch(
        db_url,
        "SELECT j.executor, e.cache_read_input_tokens AS cr, e.cache_creation_input_tokens AS cc "
        "FROM executions e JOIN jobs j ON j.id = e.job_id ORDER BY j.created_at",
    )
    assert [r["cc"] for r in jobs] == [None, None, None, None, 400]
    assert [r["cr"] for r in jobs] == [1024, 32, 800, None, 300]
    assert [(r["cr"], r["cc"]) for r in executions] == [(r["cr"], r["cc"]) for r in jobs]
    models = await fetch(
        db_url,
        "SELECT model, cache_read_input_tokens AS cr, cache_creation_input_tokens AS cc "
        "FROM execution_model_usage ORDER BY model",
    )
    assert all(r["cc"] is None for r in models if r["model"] != "claude-sonnet-4-6")
    for row in jobs:
        totals = finals[row["id"]].totals
        assert isinstance(totals, p.JobTotals)
        if row["executor"] != "anthropic":
            assert totals.cache_creation_input_tokens is p.UNSET
        else:
            assert totals.cache_creation_input_tokens == 400
    report = {r["key"]: r for r in await asyncio.to_thread(_usage_json, db_url, "executor")}
    assert report["openai"]["cacheCreationInputTokens"] is None
    assert report["openai"]["unreportedCalls"]["cacheCreationInputTokens"] == 3
    assert report["ollama"]["cacheReadInputTokens"] is None
    assert report["ollama"]["cacheCreationInputTokens"] is None
    assert report["anthropic"]["cacheCreationInputTokens"] == 400
    unreported = {
        (labels["provider"], labels["type"]): v
        for labels, v in metrics["tally_llm_calls_unreported_total"]
    }
    assert unreported[("openai", "cache_creation")] == 3
    assert unreported[("ollama", "cache_read")] == 1
    cache_creation = sum(
        v
        for labels, v in metrics["tally_tokens_total"]
        if labels["type"] == "cache_creation" and labels["provider"] != "anthropic"
    )
    assert cache_creation == 0  # nothing was reported, nothing counted


async def test_unpriced_model_has_no_cost_anywhere(db_url: str, tmp_path: Path) -> None:
    """A model no price table knows: NULL cost on the call, the execution and the job (never
    0.0), the job:update says nothing of cost and counts the unpriced call, `tally usage`
    marks it, and tally_llm_calls_unpriced_total moves."""
    body = {**completion(chat_usage(100, 10)), "model": "acme-private-7b"}
    provider = FakeProvider([Scripted(body=body)])
    with serving(provider) as url:
        async with running_service(db_url) as service:
            config = json.dumps({"base_url": url + "/v1", "api_key": "test"})
            daemon = start_daemon(ws_url(service), tmp_path / "d", "--executor", f"openai={config}")
            try:
                [final] = (
                    await _run_jobs(
                        service,
                        [
                            p.JobSpec(
                                executor="openai", model="acme-private-7b", spec={"prompt": "x"}
                            )
                        ],
                    )
                ).values()
                metrics = await asyncio.to_thread(scrape_sync, http_url(service, "/metrics"))
            finally:
                assert await stop(daemon) == 0
    assert final.status == "succeeded"
    assert isinstance(final.totals, p.JobTotals)
    assert final.totals.cost_usd is p.UNSET and final.totals.unpriced_calls == 1
    costs = await fetch(
        db_url,
        "SELECT (SELECT cost_usd FROM llm_calls) AS call, (SELECT cost_usd FROM executions) AS e, "
        "(SELECT cost_usd FROM jobs) AS j, (SELECT unpriced_calls FROM jobs) AS n",
    )
    assert (costs[0]["call"], costs[0]["e"], costs[0]["j"], costs[0]["n"]) == (None, None, None, 1)
    [row] = await asyncio.to_thread(_usage_json, db_url, "model")
    assert row["costUsd"] is None and row["unpricedCalls"] == 1
    unpriced = {labels["model"]: v for labels, v in metrics["tally_llm_calls_unpriced_total"]}
    assert unpriced == {"acme-private-7b": 1.0}
    assert sum(v for _, v in metrics.get("tally_cost_usd_total", [])) == 0


async def test_one_hour_cache_writes_cost_what_genai_prices_computes(
    db_url: str, tmp_path: Path
) -> None:
    """90k 1-hour cache-write tokens: the call's cost is exactly genai-prices' price of the
    raw response (not the 5-minute rate), and the 1-hour part is its own sub-bucket in the
    call, the execution and the job."""
    from genai_prices import calc_price, extract_usage

    raw_usage = {
        **anthropic_usage(10, 20, read=0, write=90_000),
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 90_000},
    }
    body = message("end_turn", raw_usage)
    extracted = extract_usage(body, provider_id="anthropic")
    expected = calc_price(extracted.usage, "claude-sonnet-4-6", provider_id="anthropic")
    provider = FakeProvider([Scripted(body=body)])
    with serving(provider) as url:
        async with running_service(db_url) as service:
            config = json.dumps({"base_url": url, "api_key": "test"})
            daemon = start_daemon(
                ws_url(service), tmp_path / "d", "--executor", f"anthropic={config}"
            )
            try:
                [final] = (
                    await _run_jobs(
                        service,
                        [
                            p.JobSpec(
                                executor="anthropic",
                                model="claude-sonnet-4-6",
                                spec={"prompt": "x"},
                            )
                        ],
                    )
                ).values()
            finally:
                assert await stop(daemon) == 0
    assert final.status == "succeeded"
    rows = await fetch(
        db_url,
        "SELECT c.cost_usd, c.cost_source, c.cache_creation_1h_input_tokens AS c1h, "
        "e.cache_creation_1h_input_tokens AS e1h, j.cache_creation_1h_input_tokens AS j1h "
        "FROM llm_calls c JOIN executions e ON e.id = c.execution_id "
        "JOIN jobs j ON j.id = e.job_id",
    )
    row = rows[0]
    print(f"1-hour cache writes: ledger ${row['cost_usd']}, genai-prices ${expected.total_price}")
    assert float(row["cost_usd"]) == float(expected.total_price)
    assert row["cost_source"] == "price_table"
    assert (row["c1h"], row["e1h"], row["j1h"]) == (90_000, 90_000, 90_000)
    assert isinstance(final.totals, p.JobTotals)
    assert final.totals.cache_creation_1h_input_tokens == 90_000


async def test_price_override_file_prices_a_private_model(db_url: str, tmp_path: Path) -> None:
    """`tallyd --prices FILE` prices a model no table knows; the ledger's costSource names
    the override and the cost is the file's rates applied to the call's buckets."""
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."acme-private-7b"]\ninput = 2.0\ncached_input = 0.5\noutput = 8.0\n')
    body = {**completion(chat_usage(1100, 10, cached=100)), "model": "acme-private-7b"}
    provider = FakeProvider([Scripted(body=body)])
    with serving(provider) as url:
        async with running_service(db_url) as service:
            config = json.dumps({"base_url": url + "/v1", "api_key": "test"})
            daemon = start_daemon(
                ws_url(service),
                tmp_path / "d",
                "--executor",
                f"openai={config}",
                "--prices",
                str(prices),
            )
            try:
                await _run_jobs(
                    service,
                    [p.JobSpec(executor="openai", model="acme-private-7b", spec={"prompt": "x"})],
                )
            finally:
                assert await stop(daemon) == 0
    [row] = await fetch(db_url, "SELECT cost_usd, cost_source FROM llm_calls")
    assert row["cost_source"] == "price_override"
    # 1000 uncached input at $2/M, 100 cached at $0.5/M, 10 output at $8/M
    assert float(row["cost_usd"]) == (1000 * 2.0 + 100 * 0.5 + 10 * 8.0) / 1e6


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models = [", "not valid TOML"),
        ('[models."m"]\ninput = 1.0\n', "missing 'output'"),
        ('[models."m"]\ninput = -1\noutput = 1\n', "expected a number >= 0"),
        ('[models."m"]\ninput = 1\noutput = 1\nwrite = 2\n', "unknown rate 'write'"),
        ("[other]\n", 'expected a [models."NAME"] table'),
    ],
)
def test_malformed_prices_file_is_one_line_and_exit_2(
    tmp_path: Path, text: str, expected: str
) -> None:
    """A bad prices file stops tallyd at start with one line naming the file and key."""
    prices = tmp_path / "prices.toml"
    prices.write_text(text)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "--orchestrator",
            "ws://127.0.0.1:9/ws",
            "--state-dir",
            str(tmp_path / "s"),
            "--prices",
            str(prices),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(prices) in lines[0], done.stderr


# --- budgets that hold ------------------------------------------------------------------------


async def _budgeted_jobs(db_url: str, tmp_path: Path, specs: list[p.JobSpec], *extra: str) -> Any:
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d", *extra, concurrency=4)
        try:
            finals = await _run_jobs(service, specs)
        finally:
            assert await stop(daemon) == 0
    return finals


async def test_budgets_hold_on_the_simulated_provider(db_url: str, tmp_path: Path) -> None:
    """20 budgeted jobs on a priced simulated model: the output of each call is capped so its
    worst case fits what remains, and no job spends more than its budget (the simulated
    provider's input is known before the call, so the documented bound is 0 here)."""
    budgets = [0.0004 + 0.0003 * i for i in range(20)]
    specs = [
        p.JobSpec(
            executor="simulated",
            model="sim-large",
            spec={"turns": 6, "promptTokens": 120, "outputTokens": 400, "prompt": f"job {i}"},
            limits=p.Limits(budget_usd=b),
        )
        for i, b in enumerate(budgets)
    ]
    finals = await _budgeted_jobs(db_url, tmp_path, specs)
    rows = await fetch(
        db_url,
        "SELECT cost_usd, stop_reason, (limits->>'budgetUsd')::float8 AS budget FROM jobs",
    )
    assert len(rows) == 20
    overshoot = max(float(r["cost_usd"] or 0) - r["budget"] for r in rows)
    print(f"simulated: worst overshoot over 20 budgets: ${overshoot:.9f}")
    assert overshoot <= 1e-12
    assert any(r["stop_reason"] == "budget" for r in rows)  # the budgets did bind
    assert all(f.status == "succeeded" for f in finals.values())


async def test_budget_holds_on_the_anthropic_sdk(db_url: str, tmp_path: Path) -> None:
    """A budgeted agent job on the real Anthropic SDK: every request's max_tokens is capped
    by what remains, the job stops when the next input cannot be paid, and it spends at most
    its budget plus the documented bound (the input estimate's error on one call)."""
    tool_turn = {"type": "tool_use", "id": "toolu_1", "name": "current_time", "input": {}}

    class HonoursMaxTokens(FakeProvider):
        """Like the real API: never more output than the request's max_tokens, and input
        counted from the request (about 4 bytes a token for this English content)."""

        def next(self, body: dict[str, Any]) -> Scripted:
            super().next(body)
            size = len(json.dumps([body.get("messages"), body.get("tools")]).encode())
            out = min(300, int(body["max_tokens"]))
            return Scripted(
                body=message("tool_use", anthropic_usage(size // 4, out), content=[tool_turn])
            )

    provider = HonoursMaxTokens([])
    budget = 0.02
    with serving(provider) as url:
        config = json.dumps({"base_url": url, "api_key": "test"})
        finals = await _budgeted_jobs(
            db_url,
            tmp_path,
            [
                p.JobSpec(
                    executor="anthropic",
                    model="claude-sonnet-4-6",
                    spec={
                        "prompt": "what time is it?",
                        "tools": ["current_time"],
                        "maxTokens": 4000,
                    },
                    limits=p.Limits(budget_usd=budget),
                )
            ],
            "--executor",
            f"anthropic={config}",
        )
    [final] = finals.values()
    [job] = await fetch(db_url, "SELECT cost_usd, stop_reason FROM jobs")
    caps = [r["max_tokens"] for r in provider.requests]
    print(f"anthropic: spent ${job['cost_usd']} of ${budget}; max_tokens per call {caps}")
    assert job["stop_reason"] == "budget" and final.status == "succeeded"
    assert caps == sorted(caps, reverse=True) and caps[-1] < 4000
    assert float(job["cost_usd"]) <= budget


async def test_budgeted_job_on_an_unpriced_model_stops_before_calling(
    db_url: str, tmp_path: Path
) -> None:
    """budgetUsd on a model without a price fails with stopReason "unpriced" before any
    provider call; with "allowUnpriced": true it runs."""
    provider = FakeProvider([Scripted(body={**completion(chat_usage(10, 5)), "model": "acme-x"})])
    with serving(provider) as url:
        config = json.dumps({"base_url": url + "/v1", "api_key": "test"})
        finals = await _budgeted_jobs(
            db_url,
            tmp_path,
            [
                p.JobSpec(
                    executor="openai",
                    model="acme-x",
                    spec={"prompt": "x"},
                    limits=p.Limits(budget_usd=0.000001),
                    max_attempts=1,
                ),
                p.JobSpec(
                    executor="openai",
                    model="acme-x",
                    spec={"prompt": "x", "allowUnpriced": True},
                    limits=p.Limits(budget_usd=0.000001),
                ),
            ],
            "--executor",
            f"openai={config}",
        )
    refused, allowed = finals.values()
    assert refused.status == "failed"
    assert isinstance(refused.totals, p.JobTotals) and refused.totals.stop_reason == "unpriced"
    assert allowed.status == "succeeded"
    assert len(provider.requests) == 1  # only the job that allowed unpriced spend called

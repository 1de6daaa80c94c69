"""Operator commands: `tally up --demo`, `tally usage`, `tally jobs`, `tally submit`."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from orchestrator.client import TallyClient
from shared import protocol as p
from tests.conftest import scaled
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    running_service,
    start_daemon,
    stop_daemon_async,
    submit_early,
    wait_for,
    ws_url,
)

SUMS = """
SELECT coalesce(sum(input_tokens), 0) AS input, coalesce(sum(output_tokens), 0) AS output,
       coalesce(sum(cache_read_input_tokens), 0) AS cache_read,
       coalesce(sum(cache_creation_input_tokens), 0) AS cache_creation,
       coalesce(sum(cost_usd), 0) AS cost
FROM executions
"""


def tally(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `tally` command."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_up_demo_report_equals_sql(tmp_path: Path) -> None:
    """`tally up --demo` completes, and its usage report equals an independent SQL sum."""
    demo = tally("up", "--demo", "--data-dir", str(tmp_path), "--daemons", "2", timeout=scaled(180))
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "Token usage by model" in demo.stdout
    assert "outcomes: failed 1, succeeded 43" in demo.stderr
    report = tally("usage", "--data-dir", str(tmp_path), "--format", "json")
    assert report.returncode == 0, report.stderr
    rows = json.loads(report.stdout)
    from orchestrator.local.embedded import embedded_database

    with embedded_database(tmp_path) as dsn:
        sums = asyncio.run(_sums(dsn))
    assert sum(r["inputTokens"] for r in rows) == sums["input"]
    assert sum(r["outputTokens"] for r in rows) == sums["output"]
    assert sum(r["cacheReadInputTokens"] for r in rows) == sums["cache_read"]
    assert sum(r["cacheCreationInputTokens"] for r in rows) == sums["cache_creation"]
    assert abs(sum(r["costUsd"] for r in rows) - float(sums["cost"])) < 1e-6
    total_line = next(line for line in demo.stdout.splitlines() if "total" in line)
    assert f"{sums['input']:,}" in total_line and f"{sums['cache_read']:,}" in total_line


async def _sums(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return dict(await conn.fetchrow(SUMS))
    finally:
        await conn.close()


async def test_usage_groupings_and_formats(db_url: str, tmp_path: Path) -> None:
    """usage groups by model, executor, day and label, in table, JSON and CSV."""
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                ids = await submit_early(
                    client,
                    [
                        p.JobSpec(
                            executor="simulated",
                            model=model,
                            spec={"turns": 2, "cachePrefixTokens": prefix},
                            labels={"tenant": tenant},
                        )
                        for model, prefix, tenant in [
                            ("sim-small", 1000, "a"),
                            ("sim-large", 0, "b"),
                            ("sim-small", 0, "b"),
                        ]
                    ],
                )
                await client.wait(ids, timeout=scaled(30))
        finally:
            await stop_daemon_async(daemon)
    sums = dict((await fetch(db_url, SUMS))[0])
    by_label = await asyncio.to_thread(
        tally, "usage", "--database-url", db_url, "--by", "label:tenant", "--format", "json"
    )
    rows = {r["key"]: r for r in json.loads(by_label.stdout)}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["cacheReadInputTokens"] == 1000 and rows["b"]["cacheReadInputTokens"] == 0
    assert sum(r["inputTokens"] for r in rows.values()) == sums["input"]
    assert rows["b"]["cacheHitRatio"] == 0.0
    by_model = await asyncio.to_thread(
        tally, "usage", "--database-url", db_url, "--by", "model", "--format", "csv"
    )
    parsed = list(csv.DictReader(io.StringIO(by_model.stdout)))
    assert {r["key"] for r in parsed} == {"sim-small", "sim-large"}
    assert sum(int(r["calls"]) for r in parsed) == 6
    table = await asyncio.to_thread(tally, "usage", "--database-url", db_url, "--by", "day")
    assert table.returncode == 0 and "Token usage by day" in table.stdout
    bad = await asyncio.to_thread(tally, "usage", "--database-url", db_url, "--by", "colour")
    assert bad.returncode == 2 and "--by 'colour'" in bad.stderr
    jobs = await asyncio.to_thread(tally, "jobs", "--database-url", db_url, "--label", "tenant=b")
    assert jobs.returncode == 0 and "2 most recent jobs" in jobs.stdout
    show = await asyncio.to_thread(tally, "jobs", "--database-url", db_url, "show", ids[0])
    assert show.returncode == 0 and "calls" in show.stdout and "sim-small" in show.stdout


async def test_submit_jsonl_and_wait(db_url: str, tmp_path: Path) -> None:
    """`tally submit --file` sends every line; a bad line is named; --wait prints totals."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"executor": "simulated"}\n{"executor": ""}\n')
    result = await asyncio.to_thread(
        tally, "submit", "--orchestrator", "ws://127.0.0.1:1/ws", "--file", str(bad)
    )
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(
        "\n".join(json.dumps({"executor": "simulated", "spec": {"turns": 1}}) for _ in range(5))
    )
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            result = await asyncio.to_thread(
                tally,
                "submit",
                "--orchestrator",
                ws_url(service),
                "--token",
                CLIENT_TOKEN,
                "--file",
                str(good),
                "--wait",
                "--allow-unknown-executor",
            )
        finally:
            await stop_daemon_async(daemon)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 5 and {line["status"] for line in lines} == {"succeeded"}
    assert all(line["numTurns"] == 1 for line in lines)


async def test_submit_wait_exit_codes_timeout_and_limit_flags(db_url: str, tmp_path: Path) -> None:
    """`--wait` exits 1 naming a job that failed; `--timeout` exits 1 naming the jobs still
    pending (no daemon runs them); every job limit and the priority are stored as given."""
    async with running_service(db_url) as service:
        url = ws_url(service)
        base = ("submit", "--orchestrator", url, "--token", CLIENT_TOKEN)
        # No daemon has offered `simulated` yet: refused, naming what exists, nothing written.
        unknown = await asyncio.to_thread(tally, *base, "--executor", "simulated")
        assert unknown.returncode == 2, unknown.stderr
        assert "no registered daemon offers executor 'simulated'" in unknown.stderr
        assert "$.payload.jobs[0].executor" in unknown.stderr
        bad_spec = await asyncio.to_thread(
            tally, *base, "--executor", "simulated", "--spec", '{"turns": -1}'
        )
        assert bad_spec.returncode == 2 and "$.spec.turns" in bad_spec.stderr, bad_spec.stderr
        assert not await fetch(db_url, "SELECT id FROM jobs")
        base = (*base, "--allow-unknown-executor")
        pending = await asyncio.to_thread(
            tally, *base, "--executor", "simulated", "--wait", "--timeout", "1.5"
        )
        assert pending.returncode == 1
        assert "--timeout 1.5s passed with 1 of 1 jobs still pending" in pending.stderr
        limited = await asyncio.to_thread(
            tally,
            *base,
            "--executor",
            "simulated",
            "--max-turns",
            "2",
            "--max-output-tokens",
            "500",
            "--timeout-ms",
            "9000",
            "--budget-usd",
            "0.5",
            "--max-total-tokens",
            "10000",
            "--priority",
            "7",
        )
        assert limited.returncode == 0, limited.stderr
        job_id = limited.stdout.strip()
        row = (await fetch(db_url, "SELECT limits, priority FROM jobs WHERE id = $1", job_id))[0]
        assert row["priority"] == 7
        assert json.loads(row["limits"]) == {
            "maxTurns": 2,
            "maxOutputTokens": 500,
            "maxTotalTokens": 10000,
            "budgetUsd": 0.5,
            "timeoutMs": 9000,
        }
        daemon = start_daemon(url, tmp_path / "d")
        try:
            failing = await asyncio.to_thread(
                tally,
                *base,
                "--executor",
                "simulated",
                "--spec",
                '{"turns": 1, "fail": true}',
                "--max-attempts",
                "1",
                "--wait",
                "--timeout",
                str(scaled(60)),
            )
            ok = await asyncio.to_thread(
                tally,
                *base,
                "--executor",
                "simulated",
                "--spec",
                '{"turns": 2, "prompt": "p", "outputSchema": {"type": "object"}}',
                "--wait",
                "--output",
            )
        finally:
            await stop_daemon_async(daemon)
    assert failing.returncode == 1, failing.stderr
    assert json.loads(failing.stdout)["status"] == "failed"
    assert "1 of 1 jobs did not succeed" in failing.stderr and " failed" in failing.stderr
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "succeeded"
    # The simulated agent's deterministic answer, the JSON object its outputSchema asked for.
    digest = hashlib.sha256(b"p").hexdigest()[:12]
    assert json.loads(ok.stdout)["output"] == {"answer": f"simulated-{digest}", "calls": 2}
    no_wait = await asyncio.to_thread(
        tally, "submit", "--orchestrator", url, "--executor", "simulated", "--timeout", "3"
    )
    assert no_wait.returncode == 2 and "--timeout: only with --wait" in no_wait.stderr


async def test_jobs_cancel_queued_running_and_finished(db_url: str, tmp_path: Path) -> None:
    """`tally jobs cancel`: a queued job is cancelled at once; a running one is stopped on its
    daemon with the usage it had recorded kept; a finished one is refused (exit 1); an unknown
    id is a usage error (exit 2)."""
    async with running_service(db_url) as service:
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            (queued,) = await submit_early(client, [p.JobSpec(executor="simulated")])
            done = await asyncio.to_thread(
                tally, "jobs", "--database-url", db_url, "cancel", queued
            )
            assert done.returncode == 0 and f"{queued} cancelled" in done.stdout, done.stderr
            daemon = start_daemon(ws_url(service), tmp_path / "d")
            try:
                long_job, quick = await submit_early(
                    client,
                    [
                        p.JobSpec(executor="simulated", spec={"turns": 60, "latencyMs": 150}),
                        p.JobSpec(executor="simulated", spec={"turns": 1}),
                    ],
                )
                await client.wait([quick], timeout=scaled(30))

                async def has_calls() -> bool:
                    rows = await fetch(
                        db_url,
                        "SELECT count(*) AS n FROM llm_calls c JOIN executions e"
                        " ON e.id = c.execution_id WHERE e.job_id = $1",
                        long_job,
                    )
                    return bool(rows[0]["n"] >= 2)

                await wait_for(has_calls, scaled(30))
                running = await asyncio.to_thread(
                    tally, "jobs", "cancel", long_job[:8], "--database-url", db_url
                )
                assert running.returncode == 0 and "cancel requested" in running.stdout
                final = (await client.wait([long_job], timeout=scaled(30)))[long_job]
                assert final.status == "cancelled"
            finally:
                await stop_daemon_async(daemon)
        row = (
            await fetch(
                db_url,
                "SELECT j.num_turns, j.input_tokens, (SELECT count(*) FROM llm_calls c"
                " JOIN executions e ON e.id = c.execution_id WHERE e.job_id = j.id) AS calls"
                " FROM jobs j WHERE j.id = $1",
                long_job,
            )
        )[0]
        assert 2 <= row["calls"] < 60 and row["input_tokens"] > 0
        again = await asyncio.to_thread(
            tally, "jobs", "cancel", queued, quick, "--database-url", db_url
        )
        assert again.returncode == 1
        assert f"{queued} already cancelled" in again.stdout
        assert f"{quick} already succeeded" in again.stderr
        unknown = await asyncio.to_thread(
            tally,
            "jobs",
            "cancel",
            "00000000-0000-4000-8000-000000000000",
            "--database-url",
            db_url,
        )
        assert unknown.returncode == 2


async def test_submit_delayed_start(db_url: str, tmp_path: Path) -> None:
    """`--delay 2s`: the job is not offered before 2 s after it was accepted; `--not-before`
    in the past starts at once; a bad or doubled value is a usage error (exit 2)."""
    async with running_service(db_url) as service:
        base = (
            "submit",
            "--orchestrator",
            ws_url(service),
            "--token",
            CLIENT_TOKEN,
            "--allow-unknown-executor",
        )
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            delayed = await asyncio.to_thread(
                tally, *base, "--executor", "simulated", "--delay", "2s", "--wait"
            )
            past = await asyncio.to_thread(
                tally,
                *base,
                "--executor",
                "simulated",
                "--not-before",
                "2020-01-01T00:00:00",
                "--wait",
            )
        finally:
            await stop_daemon_async(daemon)
    assert delayed.returncode == 0 and past.returncode == 0, delayed.stderr + past.stderr
    waits = {
        str(r["id"]): r["waited"]
        for r in await fetch(
            db_url,
            "SELECT j.id, extract(epoch FROM min(e.offered_at) - j.created_at) AS waited"
            " FROM jobs j JOIN executions e ON e.job_id = j.id GROUP BY j.id",
        )
    }
    assert waits[json.loads(delayed.stdout)["jobId"]] >= 1.95
    assert waits[json.loads(past.stdout)["jobId"]] < 1.9
    bad = await asyncio.to_thread(
        tally, "submit", "--orchestrator", "ws://127.0.0.1:1/ws", "--executor", "x", "--delay", "2y"
    )
    assert bad.returncode == 2 and "--delay '2y'" in bad.stderr
    both = await asyncio.to_thread(
        tally,
        "submit",
        "--orchestrator",
        "ws://127.0.0.1:1/ws",
        "--executor",
        "x",
        "--delay",
        "1s",
        "--not-before",
        "2030-01-01",
    )
    assert both.returncode == 2 and "not both" in both.stderr


async def test_jobs_shows_queued_jobs_no_daemon_can_run(db_url: str, tmp_path: Path) -> None:
    """A queued job whose executor no connected daemon offers is shown as waiting for an
    executor; one a daemon offers is not."""
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                (runnable,) = await submit_early(client, [p.JobSpec(executor="simulated")])
                await client.wait([runnable], timeout=scaled(30))
                (orphan,) = await submit_early(client, [p.JobSpec(executor="nonesuch")])
            listed = await asyncio.to_thread(
                tally, "jobs", "--database-url", db_url, "--format", "json"
            )
            table = await asyncio.to_thread(tally, "jobs", "--database-url", db_url)
        finally:
            await stop_daemon_async(daemon)
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            await client.cancel(orphan)
            await client.wait([orphan], timeout=scaled(30))
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows[orphan]["waiting_for_executor"] is True
    assert rows[runnable]["waiting_for_executor"] is False
    assert "waiting for an executor" in table.stdout


def test_daemon_refused_token_exits_3(db_url: str, tmp_path: Path) -> None:
    """tallyd with a wrong token exits 3 with a one-line message."""

    async def run() -> subprocess.CompletedProcess[str]:
        async with running_service(db_url) as service:
            return await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "daemon",
                    "--orchestrator",
                    ws_url(service),
                    "--token",
                    "wrong-token-xxxxxxxxxxxx",
                    "--state-dir",
                    str(tmp_path / "d"),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )

    result = asyncio.run(run())
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0 and "refused" in result.stderr

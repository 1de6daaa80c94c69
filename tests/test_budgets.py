"""Budgets enforced at dispatch: real PostgreSQL, real `tally serve` and `tallyd` processes.

- 3 orchestrators on one database, 6 daemons, 300 jobs labelled team=a with budgetUsd each
  and a $1.00 day budget (hold): the ledger's spend never passes $1.00 (the simulated
  executor's per-job bound is 0), the rest stay queued with the reason in `tally jobs`, and
  raising the limit releases them;
- action fail: the jobs past the limit fail with stopReason "budget", never offered;
- a period boundary (a moved clock): held jobs run after the reset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator.client import TallyClient
from shared import protocol as p
from tests.conftest import scaled
from tests.invariants import _scrape_all, assert_invariants, scrape_sync
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    free_port,
    http_url,
    listening,
    running_service,
    serve_process,
    start_daemon,
    stop_daemon_async,
    submit_early,
    wait_for,
    ws_url,
)

pytestmark = pytest.mark.slow

SPEC = {"turns": 2, "promptTokens": 20_000, "outputTokens": 2_000}


def tally(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `tally` CLI against the test database."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--database-url", db_url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def set_budget(db_url: str, name: str, *args: str) -> None:
    out = tally(db_url, "budgets", "set", name, *args)
    assert out.returncode == 0, out.stderr


async def spend(db_url: str, team: str) -> Decimal:
    """The ledger's spend for a team: the sum of its recorded calls' costs."""
    rows = await fetch(
        db_url,
        "SELECT coalesce(sum(c.cost_usd), 0) AS usd FROM llm_calls c "
        "JOIN executions e ON e.id = c.execution_id JOIN jobs j ON j.id = e.job_id "
        "WHERE j.labels @> $1::jsonb",
        json.dumps({"team": team}),
    )
    return Decimal(rows[0]["usd"])


async def counts(db_url: str) -> dict[str, int]:
    rows = await fetch(
        db_url,
        "SELECT count(*) FILTER (WHERE status IN ('running')) AS running, "
        "count(*) FILTER (WHERE status = 'queued' AND hold_reason IS NULL) AS free, "
        "count(*) FILTER (WHERE status = 'queued' AND hold_reason IS NOT NULL) AS held, "
        "count(*) FILTER (WHERE status = 'succeeded') AS succeeded, "
        "count(*) FILTER (WHERE status = 'failed') AS failed FROM jobs",
    )
    return dict(rows[0])


def jobs_of(team: str, n: int, budget_usd: float = 0.02) -> list[p.JobSpec]:
    return [
        p.JobSpec(
            executor="simulated",
            model="sim-small",
            spec={**SPEC, "prompt": f"{team} {i}"},
            labels={"team": team},
            limits=p.Limits(budget_usd=budget_usd),
        )
        for i in range(n)
    ]


async def test_three_orchestrators_hold_at_the_limit_then_release(
    db_url: str, tmp_path: Path
) -> None:
    set_budget(db_url, "team-a", "--selector", "team=a", "--limit-usd", "1.00")
    ports = [free_port() for _ in range(3)]
    serves = [
        serve_process(db_url, port, tmp_path / f"serve{i}.log") for i, port in enumerate(ports)
    ]
    daemons = []
    try:
        for port in ports:
            await wait_for(lambda port=port: listening(port), scaled(30))
        urls = [f"ws://127.0.0.1:{port}/ws" for port in ports]
        daemons = [
            start_daemon(urls[i % 3], tmp_path / f"d{i}", log=tmp_path / f"tallyd{i}.log")
            for i in range(6)
        ]
        async with TallyClient(urls[0], CLIENT_TOKEN) as client:
            await submit_early(client, jobs_of("a", 300))

        async def settled() -> bool:
            c = await counts(db_url)
            return c["running"] == 0 and c["free"] == 0 and c["held"] > 0

        await wait_for(settled, scaled(120), interval=0.3)
        at_limit = await spend(db_url, "a")
        c = await counts(db_url)
        print(f"\nheld at the limit: spend ${at_limit} of $1.00, {c}")
        assert Decimal(0) < at_limit <= Decimal("1.00")
        assert c["succeeded"] + c["held"] == 300 and c["failed"] == 0
        # The reason is visible in `tally jobs`, table and JSON.
        listed = tally(db_url, "jobs", "--status", "queued", "--format", "json", "--limit", "500")
        held = json.loads(listed.stdout)
        assert len(held) == c["held"]
        assert all(j["hold_reason"].startswith("budget team-a: $") for j in held)
        table = tally(db_url, "jobs", "--status", "queued", "--limit", "5")
        assert "queued (held: budget team-a" in table.stdout
        standing = json.loads(tally(db_url, "budgets", "list", "--format", "json").stdout)
        assert standing[0]["spentUsd"] == pytest.approx(float(at_limit))
        assert standing[0]["heldJobs"] == c["held"] and standing[0]["reservedUsd"] == 0
        # The gauges agree on every orchestrator.
        for port in ports:
            scraped = scrape_sync(f"http://127.0.0.1:{port}/metrics")
            [(labels, value)] = scraped["tally_budget_spent_usd"]
            assert labels == {"budget": "team-a"} and value == pytest.approx(float(at_limit))

        # Raising the limit releases them.
        set_budget(db_url, "team-a", "--selector", "team=a", "--limit-usd", "100")

        async def all_done() -> bool:
            return (await counts(db_url))["succeeded"] == 300

        await wait_for(all_done, scaled(180), interval=0.3)
        total = await spend(db_url, "a")
        print(f"after raising to $100: spend ${total}, 300 succeeded")
        assert total <= Decimal(100)
        await assert_invariants(db_url, [f"http://127.0.0.1:{port}/metrics" for port in ports])
    finally:
        for daemon in daemons:
            await stop_daemon_async(daemon)
        for serve in serves:
            serve.terminate()
            serve.wait(30)


async def test_action_fail_fails_jobs_with_stop_reason_budget(db_url: str, tmp_path: Path) -> None:
    set_budget(db_url, "team-b", "--selector", "team=b", "--limit-usd", "0.1", "--action", "fail")
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                ids = await submit_early(client, jobs_of("b", 20))
                await client.wait(ids, timeout=scaled(60))
        finally:
            await stop_daemon_async(daemon)
        c = await counts(db_url)
        failed = await fetch(
            db_url, "SELECT stop_reason, error, attempts FROM jobs WHERE status = 'failed'"
        )
        total = await spend(db_url, "b")
        print(f"\naction fail: spend ${total} of $0.10, {c}")
        assert total <= Decimal("0.1")
        assert c["succeeded"] > 0 and c["failed"] == 20 - c["succeeded"]
        assert all(r["stop_reason"] == "budget" and r["attempts"] == 0 for r in failed)
        assert all(r["error"].startswith("budget team-b: $") for r in failed)
        scraped = await _scrape_all([http_url(service, "/metrics")])
        jobs_failed = sum(v for lb, v in scraped["tally_jobs_total"] if lb["outcome"] == "failed")
        assert jobs_failed == c["failed"]


class MovableClock:
    """The budgets' clock, moved forward by the test."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def test_held_jobs_run_after_the_period_resets(db_url: str, tmp_path: Path) -> None:
    set_budget(db_url, "team-c", "--selector", "team=c", "--limit-usd", "0.05")
    clock = MovableClock()
    async with running_service(db_url, budget_clock=clock, budget_recheck=0.3) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                await submit_early(client, jobs_of("c", 10))

            async def settled() -> bool:
                c = await counts(db_url)
                return c["running"] == 0 and c["free"] == 0 and c["held"] > 0

            await wait_for(settled, scaled(60), interval=0.2)
            first = await counts(db_url)
            assert await spend(db_url, "c") <= Decimal("0.05")
            # The next day: spend in the new period is 0, so held jobs run.
            clock.offset = timedelta(days=1)

            async def more_ran() -> bool:
                return (await counts(db_url))["succeeded"] > first["succeeded"]

            await wait_for(more_ran, scaled(60), interval=0.2)
            after = await counts(db_url)
            print(f"\nperiod reset: before {first}, after {after}")
        finally:
            await stop_daemon_async(daemon)


def test_budget_flags_are_checked(db_url: str) -> None:
    for args, message in (
        (("--selector", "team=a", "--limit-usd", "-1"), "--limit-usd '-1': expected 0"),
        (("--selector", "team=a", "--limit-usd", "x"), "--limit-usd 'x': not a number"),
        (("--selector", "*", "--selector", "a=b", "--limit-usd", "1"), "--selector"),
        (
            ("--selector", "*", "--limit-usd", "1", "--time-zone", "Asia/Kolkata"),
            "not a whole number of hours",
        ),
        (("--selector", "*", "--limit-usd", "1", "--time-zone", "Mars/Base"), "not a known"),
    ):
        out = tally(db_url, "budgets", "set", "x", *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    out = tally(db_url, "budgets", "delete", "nope")
    assert out.returncode == 2 and "no budget nope" in out.stderr

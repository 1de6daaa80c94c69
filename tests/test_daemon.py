"""The worker daemon against a real orchestrator: crashes, outages, limits, drain."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from pathlib import Path

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

SLOW = {"turns": 6, "latencyMs": 300, "promptTokens": 100, "outputTokens": 50}


async def calls_recorded(db_url: str) -> set[tuple[str, int]]:
    """(execution, seq) of every recorded call."""
    rows = await fetch(db_url, "SELECT execution_id, seq FROM llm_calls")
    return {(str(r["execution_id"]), r["seq"]) for r in rows}


def outbox_calls(state_dir: Path) -> set[tuple[str, int]]:
    """(execution, seq) of the generation frames waiting in a daemon's outbox."""
    db = sqlite3.connect(state_dir / "outbox.sqlite3")
    try:
        keys = [k for (k,) in db.execute("SELECT key FROM outbox")]
    finally:
        db.close()
    out = set()
    for key in keys:
        eid, kind, *rest = key.split(":")
        if kind == "gen":
            out.add((eid, int(rest[0])))
    return out


async def test_sigkilled_daemon_resends_every_reported_call(db_url: str, tmp_path: Path) -> None:
    """SIGKILL with 10 jobs running, restart on the same state dir: every reported call once."""
    state = tmp_path / "d"
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), state, concurrency=10)
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            ids = await submit_early(
                client, [p.JobSpec(executor="simulated", spec=SLOW) for _ in range(10)]
            )

            async def some_calls() -> bool:
                return len(await calls_recorded(db_url)) >= 15

            await wait_for(some_calls, scaled(30))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            reported = await calls_recorded(db_url) | outbox_calls(state)
            assert len(reported) >= 15
            daemon = start_daemon(ws_url(service), state, concurrency=10)
            try:
                finals = await client.wait(ids, timeout=scaled(60))
            finally:
                assert await stop_daemon_async(daemon) == 0
    assert {f.status for f in finals.values()} == {"succeeded"}
    assert reported <= await calls_recorded(db_url)
    lost = await fetch(
        db_url,
        """
        SELECT e.id, e.input_tokens, sum(c.input_tokens) AS calls_input, count(c.seq) AS n
        FROM executions e JOIN llm_calls c ON c.execution_id = e.id
        WHERE e.status = 'lost' GROUP BY e.id""",
    )
    assert len(lost) == 10
    assert all(r["input_tokens"] == r["calls_input"] for r in lost)
    jobs = await fetch(
        db_url,
        """
        SELECT j.id FROM jobs j WHERE j.input_tokens IS DISTINCT FROM (
            SELECT sum(c.input_tokens) FROM llm_calls c JOIN executions e
            ON e.id = c.execution_id WHERE e.job_id = j.id)""",
    )
    assert jobs == []


async def test_orchestrator_down_for_five_seconds(db_url: str, tmp_path: Path) -> None:
    """The orchestrator stops for 5 s while daemons finish jobs: every result recorded once."""
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        async with running_service(db_url, lease_timeout=30.0, heartbeat_timeout=5.0) as first:
            port = first.port
            daemons = [
                start_daemon(ws_url(first), tmp_path / f"d{i}", concurrency=4) for i in range(2)
            ]
            async with TallyClient(ws_url(first), CLIENT_TOKEN) as client:
                ids = await submit_early(
                    client,
                    [
                        p.JobSpec(
                            executor="simulated",
                            spec={"turns": 4, "latencyMs": 400, "promptTokens": 10},
                        )
                        for _ in range(8)
                    ],
                )

                async def all_running() -> bool:
                    rows = await fetch(
                        db_url, "SELECT count(*) AS n FROM executions WHERE status = 'running'"
                    )
                    return int(rows[0]["n"]) == 8

                await wait_for(all_running, scaled(20))
        await asyncio.sleep(5)
        async with running_service(
            db_url, port=port, lease_timeout=30.0, heartbeat_timeout=5.0
        ) as second:
            async with TallyClient(ws_url(second), CLIENT_TOKEN) as client:
                finals = await client.wait(ids, timeout=scaled(60))
    finally:
        # Stopped whatever failed, or they would reconnect forever after the test.
        codes = [await stop_daemon_async(d) for d in daemons]
    assert codes == [0, 0]
    assert {f.status for f in finals.values()} == {"succeeded"}
    rows = await fetch(
        db_url,
        "SELECT status, count(*) AS n, sum(num_turns) AS turns FROM executions GROUP BY status",
    )
    assert [(r["status"], r["n"], r["turns"]) for r in rows] == [("succeeded", 8, 32)]
    calls = await fetch(db_url, "SELECT count(*) AS n FROM llm_calls")
    assert calls[0]["n"] == 32


async def test_max_total_tokens_stops_early(db_url: str, tmp_path: Path) -> None:
    """maxTotalTokens smaller than the work: stopped early, stopReason says so, usage kept."""
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                [job_id] = await submit_early(
                    client,
                    [
                        p.JobSpec(
                            executor="simulated",
                            spec={"turns": 10, "promptTokens": 100, "outputTokens": 100},
                            limits=p.Limits(max_total_tokens=500),
                        )
                    ],
                )
                finals = await client.wait([job_id], timeout=scaled(30))
        finally:
            await stop_daemon_async(daemon)
    final = finals[job_id]
    assert final.status == "succeeded"
    assert isinstance(final.totals, p.JobTotals)
    assert final.totals.stop_reason == "max_total_tokens"
    rows = await fetch(
        db_url, "SELECT count(*) AS n, sum(input_tokens + output_tokens) AS t FROM llm_calls"
    )
    assert 2 <= rows[0]["n"] < 10
    assert final.totals.input_tokens is not None
    assert final.totals.input_tokens + final.totals.output_tokens == rows[0]["t"]


async def test_failing_executor_reports_usage(db_url: str, tmp_path: Path) -> None:
    """An executor that raises gives a failed result with the error and the usage it had."""
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                [job_id] = await submit_early(
                    client,
                    [
                        p.JobSpec(
                            executor="simulated", spec={"turns": 3, "fail": True}, max_attempts=1
                        )
                    ],
                )
                finals = await client.wait([job_id], timeout=scaled(30))
        finally:
            await stop_daemon_async(daemon)
    totals = finals[job_id].totals
    assert finals[job_id].status == "failed"
    assert isinstance(totals, p.JobTotals)
    assert isinstance(totals.error_message, str) and "simulated failure" in totals.error_message
    assert totals.num_turns == 3 and isinstance(totals.input_tokens, int)


async def test_unsupported_spec_rejected(db_url: str, tmp_path: Path) -> None:
    """An offer the daemon cannot run (a tool it does not have: only the daemon knows its
    tools; a bad value is refused at submit) is rejected and the job fails."""
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                [job_id] = await submit_early(
                    client,
                    [
                        p.JobSpec(
                            executor="simulated", spec={"tools": ["no-such-tool"]}, max_attempts=1
                        )
                    ],
                )
                finals = await client.wait([job_id], timeout=scaled(30))
        finally:
            await stop_daemon_async(daemon)
    assert finals[job_id].status == "failed"
    rows = await fetch(db_url, "SELECT status, error FROM executions")
    assert rows[0]["status"] == "rejected" and "no-such-tool" in rows[0]["error"]
    assert "$.spec.tools" in rows[0]["error"]


async def test_sigterm_drains_running_jobs(db_url: str, tmp_path: Path) -> None:
    """SIGTERM lets running jobs finish, waits for the acks and exits 0 with an empty outbox."""
    state = tmp_path / "d"
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), state)
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            ids = await submit_early(
                client,
                [
                    p.JobSpec(executor="simulated", spec={"turns": 3, "latencyMs": 300})
                    for _ in range(3)
                ],
            )

            async def started() -> bool:
                rows = await fetch(db_url, "SELECT count(*) AS n FROM llm_calls")
                return int(rows[0]["n"]) >= 1

            await wait_for(started, scaled(20))
            assert await stop_daemon_async(daemon) == 0
            finals = await client.wait(ids, timeout=scaled(10))
    assert {f.status for f in finals.values()} == {"succeeded"}
    assert outbox_calls(state) == set()


async def test_cancel_stops_job_and_reports_spend(db_url: str, tmp_path: Path) -> None:
    """job:cancel stops a running job; its result says cancelled and keeps what it spent."""
    async with running_service(db_url) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                [job_id] = await submit_early(
                    client, [p.JobSpec(executor="simulated", spec={"turns": 50, "latencyMs": 200})]
                )

                async def two_calls() -> bool:
                    rows = await fetch(db_url, "SELECT count(*) AS n FROM llm_calls")
                    return int(rows[0]["n"]) >= 2

                await wait_for(two_calls, scaled(20))
                await client.cancel(job_id)
                finals = await client.wait([job_id], timeout=scaled(20))
        finally:
            await stop_daemon_async(daemon)
    assert finals[job_id].status == "cancelled"
    rows = await fetch(
        db_url, "SELECT status, stop_reason, num_turns, input_tokens FROM executions"
    )
    assert rows[0]["status"] == "cancelled" and rows[0]["stop_reason"] == "cancelled"
    assert 2 <= rows[0]["num_turns"] < 50 and rows[0]["input_tokens"] > 0

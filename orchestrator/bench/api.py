"""``tally bench api``: the usage API under load while jobs run.

A real ``tally serve`` (short leases, so a starved lease renewal or accept shows as a lost or
re-run execution) and D real ``tallyd`` processes with the simulated executor. The ledger is
seeded first (``orchestrator.bench.report.seed``: N executions of 10 calls over 30 days, 20
teams, two models, plus one job of thousands of calls). Then N jobs are submitted and, while
they run, R clients with one client token each ask heavy reports in a loop (usage by
``model,label:team,hour`` and by ``day,label:team`` over 30 days, and the long job in detail),
R requests at a time, until every job is done.

One JSON object: the API's answers by status and their p50/p99 latency, the jobs' round trips
(submission to finish, from the ledger), and the lost and re-run executions (must be 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from orchestrator.bench.ingest import bench_database, spawn_serve
from orchestrator.bench.report import seed
from orchestrator.bench.seed import seed_long_job
from orchestrator.client import TallyClient
from shared import protocol as p

# The heavy forms the clients ask, in turn.
USAGE_PATHS = (
    "/api/v1/usage?by=model,label:team,hour&since=30d",
    "/api/v1/usage?by=day,label:team,model&since=30d",
)
# Short deadlines: a starved renewal or accept loses the execution within seconds.
SERVE_FLAGS = (
    "--lease-timeout",
    "2",
    "--heartbeat-interval",
    "0.5",
    "--heartbeat-timeout",
    "2",
    "--offer-timeout",
    "2",
)
BENCH_LABEL = {"bench": "api"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One API answer: what was asked, its status and time, and what the body held."""

    path: str
    status: int
    seconds: float
    rows: int | None = None  # usage groups, or a job's calls
    truncated: bool = False  # a Link rel="next" header came with it
    retry_after: str | None = None
    error: str | None = None


async def http_get(port: int, path: str, token: str, timeout: float = 60.0) -> Sample:
    """One GET on loopback (HTTP/1.1, the connection closed after it), summarised."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
    seconds = time.perf_counter() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        return Sample(path, 0, seconds, error=f"no HTTP answer: {raw[:80]!r}")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    rows, message = None, None
    document = msgspec.json.decode(body) if body.strip() else None
    if status == 200 and isinstance(document, list):
        rows = len(document)
    elif status == 200 and isinstance(document, dict):
        rows = len(document.get("calls", []))
    elif isinstance(document, dict):
        message = str(document.get("error"))
    return Sample(
        path,
        status,
        seconds,
        rows,
        'rel="next"' in headers.get("link", ""),
        headers.get("retry-after"),
        message,
    )


async def load(
    port: int, token: str, paths: list[str], clients: int, stop: asyncio.Event
) -> list[Sample]:
    """``client_link`` loops, each asking the paths in turn until ``stop``: that many requests
    in flight at every moment. A request that fails outright is a sample with status 0."""
    samples: list[Sample] = []

    async def client(i: int) -> None:
        n = i
        while not stop.is_set():
            path = paths[n % len(paths)]
            n += 1
            try:
                samples.append(await http_get(port, path, token))
            except (OSError, TimeoutError, ValueError) as exc:
                samples.append(Sample(path, 0, 0.0, error=repr(exc)))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return samples


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of the values in milliseconds, None without values."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(
        statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] * 1000, 1
    )


async def seed_ledger(dsn: str, executions: int, long_job_calls: int) -> tuple[str, float]:
    """Seed the ledger (the long job first: the rollups are built from every call)."""
    conn = await asyncpg.connect(dsn)
    try:
        job_id = await seed_long_job(conn, long_job_calls)
        seconds = await seed(conn, executions)
    finally:
        await conn.close()
    return job_id, seconds


async def ledger_outcome(dsn: str) -> dict[str, Any]:
    """Lost executions, jobs started more than once, and the bench jobs' round trips."""
    conn = await asyncpg.connect(dsn)
    try:
        lost = await conn.fetchval("SELECT count(*) FROM executions WHERE status = 'lost'")
        rerun = await conn.fetchval(
            """
            SELECT count(*) FROM (
                SELECT job_id FROM executions WHERE started_at IS NOT NULL
                GROUP BY job_id HAVING count(*) > 1
            ) x
            """
        )
        trips = await conn.fetch(
            """
            SELECT status, extract(epoch FROM finished_at - created_at) AS s FROM jobs
            WHERE labels @> $1::jsonb
            """,
            json.dumps(BENCH_LABEL),
        )
    finally:
        await conn.close()
    return {
        "lost": int(lost),
        "rerun": int(rerun),
        "statuses": dict(Counter(r["status"] for r in trips)),
        "seconds": [float(r["s"]) for r in trips if r["s"] is not None],
    }


def scrape_lost(port: int) -> float:
    """``tally_executions_lost_total`` of the serve process."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("tally_executions_lost_total "):
            return float(line.split()[1])
    return 0.0


def start_daemons(stack: ExitStack, port: int, token: str, daemons: int, slots: int) -> None:
    """Real ``tallyd`` processes, stopped with the stack."""
    state = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    for i in range(daemons):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon",
                "--orchestrator",
                f"ws://127.0.0.1:{port}/ws",
                "--token",
                token,
                "--state-dir",
                str(state / f"d{i}"),
                "--max-concurrent-jobs",
                str(slots),
                "--log-level",
                "warning",
            ],
            env={**os.environ},
        )
        stack.callback(proc.wait, 30)
        stack.callback(proc.terminate)


async def run(
    requests: int,
    n_jobs: int,
    daemons: int,
    executions: int,
    latency_ms: int,
    database_url: str | None,
    data_dir: Path | None,
) -> dict[str, Any]:
    """Run the benchmark and return its JSON-able summary."""
    async with bench_database(database_url, data_dir) as dsn:
        long_job, seed_seconds = await seed_ledger(dsn, executions, 3000)
        paths = [*USAGE_PATHS, f"/api/v1/jobs/{long_job}"]
        with ExitStack() as stack:  # children stop before the database is dropped
            daemon_token, client_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            port, _ = await spawn_serve(stack, dsn, daemon_token, client_token, *SERVE_FLAGS)
            start_daemons(stack, port, daemon_token, daemons, 32)
            spec = {"turns": 2, "latencyMs": latency_ms, "promptTokens": 100, "outputTokens": 10}
            async with TallyClient(f"ws://127.0.0.1:{port}/ws", client_token) as client:
                stop = asyncio.Event()
                started = time.perf_counter()
                ids = await client.submit(
                    [
                        p.JobSpec(executor="simulated", spec=spec, labels=BENCH_LABEL)
                        for _ in range(n_jobs)
                    ],
                    allow_unknown_executor=True,  # its daemons are starting beside it
                )
                loader = asyncio.create_task(load(port, client_token, paths, requests, stop))
                try:
                    await client.wait(ids, timeout=600)
                finally:
                    stop.set()
                jobs_seconds = time.perf_counter() - started
                samples = await loader
            lost_counter = await asyncio.to_thread(scrape_lost, port)
        outcome = await ledger_outcome(dsn)
    ok = [s.seconds for s in samples if s.status == 200]
    every = [s.seconds for s in samples if s.status != 0]
    return {
        "bench": "api",
        "requests_in_flight": requests,
        "jobs": n_jobs,
        "daemons": daemons,
        "latency_ms_per_call": latency_ms,
        "seeded_executions": executions,
        "seed_seconds": round(seed_seconds, 1),
        "api": {
            "answers": len(samples),
            "by_status": dict(sorted(Counter(str(s.status) for s in samples).items())),
            "answers_per_second": round(len(samples) / jobs_seconds, 1),
            "ok_p50_ms": percentile(ok, 0.5),
            "ok_p99_ms": percentile(ok, 0.99),
            "all_p50_ms": percentile(every, 0.5),
            "all_p99_ms": percentile(every, 0.99),
            "most_rows": max((s.rows or 0 for s in samples), default=0),
            "truncated": sum(1 for s in samples if s.truncated),
        },
        "job_round_trip": {
            "seconds_all": round(jobs_seconds, 2),
            "p50_ms": percentile(outcome["seconds"], 0.5),
            "p99_ms": percentile(outcome["seconds"], 0.99),
            "statuses": outcome["statuses"],
        },
        "executions_lost": outcome["lost"],
        "tally_executions_lost_total": lost_counter,
        "jobs_run_twice": outcome["rerun"],
    }

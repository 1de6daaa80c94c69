"""``tally bench ingest``: durable-and-acknowledged results per second beside raw COPY.

A real ``tally serve`` runs as a child process; N daemon connections from this process
stream ``job:result`` frames for assigned executions as fast as acks allow. In the same run
and on the same database, the same number of equivalent result rows (an execution row with
its totals and two per-model rows) are written with ``COPY``, three times, and the median
rate is the baseline: the ceiling PostgreSQL itself sets for this data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from orchestrator import migrate
from orchestrator.embedded import resolve_database
from orchestrator.loadgen import sample_result, stream_results
from orchestrator.localstack import free_port
from orchestrator.store.seed import seed_running_executions
from shared import protocol as p


async def _fresh_database(admin_dsn: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    name = f"tally_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(admin_dsn)
    dsn = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.up(conn, migrate.discover())
    finally:
        await conn.close()
    return dsn


async def _drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop a bench database: left behind, each run's rows would be vacuumed during the next."""
    from urllib.parse import urlsplit

    conn = await asyncpg.connect(admin_dsn)
    try:
        name = urlsplit(dsn).path.lstrip("/")
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def bench_database(database_url: str | None, data_dir: Path | None) -> AsyncIterator[str]:
    """A freshly migrated database for one bench run, dropped afterwards."""
    with resolve_database(database_url, data_dir) as (admin, _):
        dsn = await _fresh_database(admin)
        try:
            yield dsn
        finally:
            await _drop_database(admin, dsn)


async def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"tally serve exited with {proc.returncode}")
        try:
            await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{port}/readyz", None, 1
            )
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("tally serve did not become ready")


async def spawn_serve(stack: ExitStack, dsn: str, daemon_token: str, client_token: str) -> int:
    """Start a real `tally serve` child on a free port (stopped with the stack); return the port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ],
        env={
            **os.environ,
            "TALLY_DATABASE_URL": dsn,
            "TALLY_DAEMON_TOKENS": daemon_token,
            "TALLY_CLIENT_TOKENS": client_token,
        },
    )
    stack.callback(proc.wait, 30)
    stack.callback(proc.terminate)
    await _wait_ready(port, proc)
    return port


async def _checkpoint(conn: asyncpg.Connection) -> None:
    """Start each phase with no dirty pages left by the one before (skipped without rights)."""
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        pass


COPY_ROUNDS = 3


async def _copy_baseline(dsn: str, n: int) -> float:
    """COPY n result-equivalent rows (execution + 2 model rows); return rows per second."""
    conn = await asyncpg.connect(dsn)
    try:
        job_ids = [uuid.uuid4() for _ in range(n)]
        await conn.execute(
            "INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status) "
            "VALUES ('copy', 'bench', 'bench', 1, 'disconnected') ON CONFLICT DO NOTHING"
        )
        await conn.copy_records_to_table(
            "jobs",
            records=[(j, "simulated", "succeeded") for j in job_ids],
            columns=["id", "executor", "status"],
        )
        now = datetime.now(UTC)
        executions, usage = [], []
        for i, job_id in enumerate(job_ids):
            eid = uuid.uuid4()
            frame = sample_result(str(eid), i).payload
            executions.append(
                (
                    eid,
                    job_id,
                    1,
                    "copy",
                    "succeeded",
                    now,
                    now,
                    now,
                    "end_turn",
                    12.5,
                    2,
                    frame.input_tokens,
                    frame.output_tokens,
                    frame.cache_read_input_tokens,
                    frame.cache_creation_input_tokens,
                    False,
                    frame.cost_usd,
                    "provider",
                    p.encode_json(frame.model_usage),
                )
            )
            for e in frame.model_usage or []:
                usage.append(
                    (
                        eid,
                        e.model,
                        e.provider,
                        e.input_tokens,
                        e.output_tokens,
                        e.cache_read_input_tokens,
                        e.cache_creation_input_tokens,
                        e.cost_usd,
                    )
                )
        await _checkpoint(conn)
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(
                "executions",
                records=executions,
                columns=[
                    "id",
                    "job_id",
                    "attempt",
                    "daemon_id",
                    "status",
                    "offered_at",
                    "finished_at",
                    "result_recorded_at",
                    "stop_reason",
                    "duration_ms",
                    "num_turns",
                    "input_tokens",
                    "output_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                    "tokens_unavailable",
                    "cost_usd",
                    "cost_source",
                    "model_usage",
                ],
            )
            await conn.copy_records_to_table(
                "execution_model_usage",
                records=usage,
                columns=[
                    "execution_id",
                    "model",
                    "provider",
                    "input_tokens",
                    "output_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                    "cost_usd",
                ],
            )
        return n / (time.perf_counter() - started)
    finally:
        await conn.close()


async def _measure(
    stack: ExitStack, dsn: str, connections: int, per: int
) -> tuple[float, int, int, list[float], list[float]]:
    """Stream the results through a `tally serve` child, then COPY the same amount."""
    conn = await asyncpg.connect(dsn)
    daemons = [f"bench-{i}" for i in range(connections)]
    assigned = await seed_running_executions(conn, daemons, per)
    await _checkpoint(conn)
    await conn.close()
    token = secrets.token_urlsafe(24)
    port = await spawn_serve(stack, dsn, token, secrets.token_urlsafe(24))
    frames = {d: [sample_result(eid, i) for i, eid in enumerate(assigned[d])] for d in daemons}
    started = time.perf_counter()
    stats = await asyncio.gather(
        *(
            stream_results(f"ws://127.0.0.1:{port}/ws", token, d, frames[d])  # type: ignore[arg-type]
            for d in daemons
        )
    )
    elapsed = time.perf_counter() - started
    latencies = sorted(x for s in stats for x in s.latencies)
    check = await asyncpg.connect(dsn)
    try:
        recorded = await check.fetchval(
            "SELECT count(*) FROM executions WHERE result_recorded_at IS NOT NULL"
        )
    finally:
        await check.close()
    # The baseline is the median of three COPY rounds (fresh rows each): one round of a few
    # seconds swings by a third on a shared machine, and the ratio inherits all of it.
    copy_rates = [await _copy_baseline(dsn, connections * per) for _ in range(COPY_ROUNDS)]
    return elapsed, sum(s.acked for s in stats), int(recorded), latencies, copy_rates


async def run(
    connections: int, results: int, database_url: str | None, data_dir: Path | None
) -> dict[str, Any]:
    """Run the benchmark and return its JSON-able summary."""
    per = max(1, results // connections)
    total = per * connections
    async with bench_database(database_url, data_dir) as dsn:
        with ExitStack() as stack:  # the server child stops before the database is dropped
            measured = await _measure(stack, dsn, connections, per)
    elapsed, acked, recorded, latencies, copy_rates = measured
    copy_rate = statistics.median(copy_rates)
    rate = acked / elapsed
    return {
        "bench": "ingest",
        "connections": connections,
        "results": total,
        "acked": acked,
        "recorded": recorded,
        "resultsPerSecond": round(rate),
        "ackLatencyP50Ms": round(statistics.median(latencies) * 1000, 2),
        "ackLatencyP99Ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "copyRowsPerSecond": round(copy_rate),
        "copyRoundsRowsPerSecond": [round(r) for r in copy_rates],
        "ratioToCopy": round(rate / copy_rate, 3),
    }

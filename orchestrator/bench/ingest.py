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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from orchestrator.bench.loadgen import sample_result, stream_results
from orchestrator.bench.seed import seed_running_executions
from orchestrator.local.embedded import resolve_database
from orchestrator.local.stack import free_port
from orchestrator.store import migrations as migrate
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


async def spawn_serve(
    stack: ExitStack, dsn: str, daemon_token: str, client_token: str, *extra: str
) -> tuple[int, int]:
    """Start a real `tally serve` child on a free port (stopped with the stack).

    Returns its port and process id.
    """
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
            *extra,
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
    return port, proc.pid


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used, from /proc; None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by a set of processes between two readings (None if any is unreadable, e.g.
    a database on another host)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = [cpu_seconds(pid) for pid in pids]

    def include(self, pids: list[int]) -> None:
        """Also count processes started since the first reading, from their start."""
        for pid in pids:
            if pid not in self.pids:
                self.pids.append(pid)
                self.start.append(0.0)

    def used(self) -> float | None:
        total = 0.0
        for pid, start in zip(self.pids, self.start, strict=True):
            end = cpu_seconds(pid)
            if start is None or end is None:
                return None
            total += end - start
        return total


async def _backend_pids(conn: asyncpg.Connection) -> list[int]:
    """The server processes of the other connections to this database."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return [int(r["pid"]) for r in rows]


def _per_result(seconds: float | None, n: int) -> float | None:
    return None if seconds is None else round(seconds / n * 1e6, 1)


async def _checkpoint(conn: asyncpg.Connection) -> None:
    """Start each phase with no dirty pages left by the one before (skipped without rights)."""
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        pass


COPY_ROUNDS = 3


@dataclass
class CopyRound:
    """One COPY round: rows per second, and CPU per row of the server and of this client."""

    rate: float
    server_cpu: float | None
    client_cpu: float


async def _copy_baseline(dsn: str, n: int) -> CopyRound:
    """COPY n result-equivalent rows (execution + 2 model rows)."""
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
        server = CpuMeter([conn.get_server_pid()])
        client = time.process_time()
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
        elapsed = time.perf_counter() - started
        return CopyRound(n / elapsed, server.used(), time.process_time() - client)
    finally:
        await conn.close()


@dataclass
class Measured:
    """What one run saw: the stream through `tally serve`, then the COPY rounds."""

    elapsed: float
    acked: int
    recorded: int
    latencies: list[float]
    serve_cpu: float | None
    postgres_cpu: float | None
    copies: list[CopyRound]


async def _measure(
    stack: ExitStack, dsn: str, connections: int, per: int, serve_args: tuple[str, ...]
) -> Measured:
    """Stream the results through a `tally serve` child, then COPY the same amount."""
    conn = await asyncpg.connect(dsn)
    try:
        daemons = [f"bench-{i}" for i in range(connections)]
        assigned = await seed_running_executions(conn, daemons, per)
        await _checkpoint(conn)
        token = secrets.token_urlsafe(24)
        port, serve_pid = await spawn_serve(
            stack, dsn, token, secrets.token_urlsafe(24), *serve_args
        )
        frames = {d: [sample_result(eid, i) for i, eid in enumerate(assigned[d])] for d in daemons}
        serve = CpuMeter([serve_pid])
        postgres = CpuMeter(await _backend_pids(conn))  # the server's writer connections
        started = time.perf_counter()
        stats = await asyncio.gather(
            *(
                stream_results(f"ws://127.0.0.1:{port}/ws", token, d, frames[d])  # type: ignore[arg-type]
                for d in daemons
            )
        )
        elapsed = time.perf_counter() - started
        postgres.include(await _backend_pids(conn))  # connections opened meanwhile
        serve_cpu, postgres_cpu = serve.used(), postgres.used()
        recorded = await conn.fetchval(
            "SELECT count(*) FROM executions WHERE result_recorded_at IS NOT NULL"
        )
    finally:
        await conn.close()
    # The baseline is the median of three COPY rounds (fresh rows each): one round of a few
    # seconds swings by a third on a shared machine, and the ratio inherits all of it.
    copies = [await _copy_baseline(dsn, connections * per) for _ in range(COPY_ROUNDS)]
    return Measured(
        elapsed=elapsed,
        acked=sum(s.acked for s in stats),
        recorded=int(recorded),
        latencies=sorted(x for s in stats for x in s.latencies),
        serve_cpu=serve_cpu,
        postgres_cpu=postgres_cpu,
        copies=copies,
    )


async def run(
    connections: int,
    results: int,
    database_url: str | None,
    data_dir: Path | None,
    otlp_endpoint: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its JSON-able summary.

    Besides rates, it reports CPU per result where /proc can see the processes (a local
    server): of `tally serve` and of the PostgreSQL backends while streaming, and of the
    PostgreSQL backend and this client during the median COPY round.
    """
    per = max(1, results // connections)
    total = per * connections
    async with bench_database(database_url, data_dir) as dsn:
        with ExitStack() as stack:  # the server child stops before the database is dropped
            serve_args = () if otlp_endpoint is None else ("--otlp-endpoint", otlp_endpoint)
            m = await _measure(stack, dsn, connections, per, serve_args)
    copy = sorted(m.copies, key=lambda c: c.rate)[len(m.copies) // 2]
    rate = m.acked / m.elapsed
    return {
        "bench": "ingest",
        "connections": connections,
        "results": total,
        "otlpEndpoint": otlp_endpoint,
        "acked": m.acked,
        "recorded": m.recorded,
        "resultsPerSecond": round(rate),
        "ackLatencyP50Ms": round(statistics.median(m.latencies) * 1000, 2),
        "ackLatencyP99Ms": round(m.latencies[int(len(m.latencies) * 0.99) - 1] * 1000, 2),
        "copyRowsPerSecond": round(copy.rate),
        "copyRoundsRowsPerSecond": [round(c.rate) for c in m.copies],
        "ratioToCopy": round(rate / copy.rate, 3),
        "cpuMicrosPerResult": {
            "serve": _per_result(m.serve_cpu, total),
            "postgres": _per_result(m.postgres_cpu, total),
            "copyPostgres": _per_result(copy.server_cpu, total),
            "copyClient": _per_result(copy.client_cpu, total),
        },
    }

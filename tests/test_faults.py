"""Kill everything once: the orchestrator, a daemon and PostgreSQL, each with SIGKILL mid-run.

500 simulated jobs on 3 real ``tallyd`` processes through a real ``tally serve`` process and
an embedded PostgreSQL of this test's own. Afterwards every job is terminal, no job was
decided by two executions, no call is stored twice, totals equal their parts, and the
counters of the orchestrator process that survived to the end equal what the ledger recorded
during its life.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest

from orchestrator.client import TallyClient
from orchestrator.store import migrations as migrate
from shared import protocol as p
from shared.errors import TallyError
from tests.conftest import scaled
from tests.invariants import assert_invariants
from tests.stack import (
    CLIENT_TOKEN,
    free_port,
    serve_process,
    start_daemon,
    stop_daemon,
)

JOBS = 500


def _serve(dsn: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    return serve_process(
        dsn,
        port,
        log,
        "--heartbeat-interval",
        "0.5",
        "--heartbeat-timeout",
        "3",
        "--offer-timeout",
        "3",
        "--lease-timeout",
        "5",
        "--log-level",
        "warning",
    )


def _kill_postgres(pgdata: Path) -> None:
    pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    os.kill(pid, signal.SIGKILL)


def _restart_postgres(pgdata: Path) -> None:
    from orchestrator.local.embedded import restart

    deadline = time.monotonic() + scaled(60)
    while True:  # the killed server's backends notice its death and leave within moments
        try:
            restart(pgdata)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def _own_postgres(root: Path) -> Iterator[str]:
    from orchestrator.local.embedded import embedded_database, pg_ctl

    with embedded_database(root) as dsn:
        yield dsn
        with contextlib.suppress(Exception):  # a restarted server is ours to stop
            pg_ctl(root / "pgdata", "-w", "-m", "fast", "stop")


async def _db_now(dsn: str) -> datetime:
    conn = await asyncpg.connect(dsn)
    try:
        value: datetime = await conn.fetchval("SELECT now()")
        return value
    finally:
        await conn.close()


async def _unfinished(dsn: str) -> int:
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return -1
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')"
        )
        return n
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


@pytest.mark.slow
async def test_sigkill_of_orchestrator_daemon_and_postgres_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    """500 jobs through SIGKILL of `tally serve`, of one `tallyd` and of PostgreSQL."""
    with _own_postgres(tmp_path) as dsn:
        conn = await asyncpg.connect(dsn)
        await migrate.up(conn, migrate.discover())
        await conn.close()
        port = free_port()
        url, metrics_url = f"ws://127.0.0.1:{port}/ws", f"http://127.0.0.1:{port}/metrics"
        log = tmp_path / "serve.log"
        serve = _serve(dsn, port, log)
        daemons = [start_daemon(url, tmp_path / f"d{i}", concurrency=4) for i in range(3)]
        try:
            async with asyncio.timeout(scaled(30)):
                while True:
                    try:
                        async with TallyClient(url, CLIENT_TOKEN) as client:
                            await client.submit(
                                [
                                    p.JobSpec(
                                        executor="simulated",
                                        model=["sim-small", "sim-large"][i % 2],
                                        spec={
                                            "turns": 1 + i % 3,
                                            "latencyMs": 40,
                                            "cachePrefixTokens": 500 * (i % 2),
                                        },
                                        max_attempts=6,
                                    )
                                    for i in range(JOBS)
                                ]
                            )
                        break
                    except TallyError:  # not listening yet
                        await asyncio.sleep(0.2)
            await asyncio.sleep(1.5)
            serve.send_signal(signal.SIGKILL)
            serve.wait()
            await asyncio.sleep(1.0)
            since = await _db_now(dsn)
            serve = _serve(dsn, port, log)
            await asyncio.sleep(2.0)
            daemons[0].send_signal(signal.SIGKILL)
            daemons[0].wait()
            daemons[0] = start_daemon(url, tmp_path / "d0", concurrency=4)
            await asyncio.sleep(2.0)
            _kill_postgres(tmp_path / "pgdata")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(_restart_postgres, tmp_path / "pgdata")
            deadline = time.monotonic() + scaled(240)
            while await _unfinished(dsn) != 0:
                assert time.monotonic() < deadline, "jobs still unfinished"
                assert serve.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.5)
            # Let the daemons' last resends and acks settle, then check everything.
            await asyncio.sleep(2.0)
            rows = await _rows(dsn, "SELECT status, count(*) AS n FROM jobs GROUP BY status")
            statuses = {r["status"]: r["n"] for r in rows}
            print(f"job outcomes after the kills: {statuses}")
            assert sum(statuses.values()) == JOBS
            assert statuses.get("succeeded", 0) >= JOBS * 0.95
            await assert_invariants(dsn, metrics_url, since)
        finally:
            codes = [await asyncio.to_thread(stop_daemon, d) for d in daemons]
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
        assert codes == [0, 0, 0]


async def _rows(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()

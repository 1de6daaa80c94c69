"""Helpers that start real orchestrators and daemons on port 0 for the tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg

from orchestrator.config import ServeSettings
from orchestrator.service import Service

DAEMON_TOKEN = "daemon-token-0123456789"
CLIENT_TOKEN = "client-token-0123456789"


def settings(db_url: str, **overrides: Any) -> ServeSettings:
    """Test settings: port 0, fast heartbeats; deadlines loose enough for a loaded CI box.

    Tests about heartbeat deadlines and lease expiry pass shorter ones explicitly.
    """
    base = ServeSettings(
        database_url=db_url,
        host="127.0.0.1",
        port=0,
        daemon_tokens=(DAEMON_TOKEN,),
        client_tokens=(CLIENT_TOKEN,),
        heartbeat_interval=0.3,
        heartbeat_timeout=5.0,
        offer_timeout=3.0,
        lease_timeout=6.0,
        reap_interval=0.2,
        requeue_backoff=0.1,
        snapshot_interval=0.3,
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running_service(
    db_url: str, check_invariants: bool = True, **overrides: Any
) -> AsyncIterator[Service]:
    """An orchestrator served in this process until the block ends, then the invariants."""
    started_at = None
    if check_invariants:
        rows = await fetch(db_url, "SELECT now() AS t")
        started_at = rows[0]["t"]
    service = Service(settings(db_url, **overrides))
    started = asyncio.Event()
    task = asyncio.create_task(service.run(started))
    waiter = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
    try:
        yield service
        if check_invariants:
            # Whatever the test was written for, the ledger it leaves holds the invariants,
            # and this process's counters equal what it recorded.
            from tests.invariants import assert_invariants

            plain = service.settings.tls_cert is None  # scraped over plain HTTP only
            metrics = http_url(service, "/metrics") if plain else None
            await assert_invariants(db_url, metrics, started_at)
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)


def ws_url(service: Service) -> str:
    """The service's WebSocket URL."""
    return f"ws://127.0.0.1:{service.port}/ws"


def http_url(service: Service, path: str) -> str:
    """A URL on the service's HTTP side."""
    return f"http://127.0.0.1:{service.port}{path}"


def start_daemon(
    url: str,
    state_dir: Path,
    *extra: str,
    token: str = DAEMON_TOKEN,
    concurrency: int = 4,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """A real `tallyd` process (its output to ``log`` when given, else inherited)."""
    out = log.open("ab") if log is not None else None
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon",
            "--orchestrator",
            url,
            "--token",
            token,
            "--state-dir",
            str(state_dir),
            "--max-concurrent-jobs",
            str(concurrency),
            "--log-level",
            os.environ.get("TALLY_TEST_DAEMON_LOG", "warning"),
            *extra,
        ],
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def listening(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_process(
    dsn: str, port: int, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A real `tally serve` process on ``port``, its output appended to ``log``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            dsn,
            "--daemon-token",
            DAEMON_TOKEN,
            "--client-token",
            CLIENT_TOKEN,
            *extra,
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM a daemon and wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def fetch(db_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on its own connection."""
    conn = await asyncpg.connect(db_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> None:
    """Poll an async predicate until true, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def stop_daemon_async(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM a daemon and wait for it without blocking the loop the orchestrator runs on."""
    return await asyncio.to_thread(stop_daemon, proc, timeout)


async def submit_early(client: Any, jobs: list[Any]) -> list[str]:
    """Submit jobs while the test's daemons may still be registering: an executor no daemon
    has offered yet is allowed (``--allow-unknown-executor``), the jobs wait for it."""
    ids: list[str] = await client.submit(jobs, allow_unknown_executor=True)
    return ids

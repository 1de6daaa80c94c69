"""The side loops of ``tally serve`` (reaper, cancel sweep) outlive any failed round (review 2,
findings 11 and 12): a statement cancelled under them is logged, and the server goes on."""

from __future__ import annotations

import asyncio
import urllib.request

import asyncpg
import pytest

from orchestrator import upkeep
from tests.conftest import scaled
from tests.rawdaemon import RawDaemon
from tests.stack import http_url, running_service, wait_for, ws_url

# Text found only in the cancel sweep's read and in the reaper's expiry statement.
SWEEP_SQL = "%j.cancel_requested AND j.status%"
REAPER_SQL = "%lease_expires_at < now()%"


async def _cancel_blocked(conn: asyncpg.Connection, pattern: str, timeout: float) -> None:
    """Wait until a backend running a statement like ``pattern`` waits on a lock, then
    cancel that statement (QueryCanceledError in its client, SQLSTATE 57014). ``conn`` is
    outside any transaction: pg_stat_activity is read once per transaction."""

    async def blocked() -> bool:
        pids = await conn.fetch(
            """SELECT pid FROM pg_stat_activity
               WHERE wait_event_type = 'Lock' AND query LIKE $1 AND pid <> pg_backend_pid()""",
            pattern,
        )
        for r in pids:
            await conn.execute("SELECT pg_cancel_backend($1)", r["pid"])
        return bool(pids)

    await wait_for(blocked, timeout)


async def test_cancelled_statements_do_not_stop_the_server(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel sweep and a reaper whose statement is cancelled (pg_cancel_backend) log it and
    go on: ``tally serve`` stays up, and both loops run their statements again."""
    monkeypatch.setattr(upkeep, "CANCEL_SWEEP_INTERVAL", 0.3)
    async with running_service(db_url, reap_interval=0.2) as service:
        raw = RawDaemon(ws_url(service), "raw-side")  # the sweep reads only for daemons
        await raw.connect()
        pongs = asyncio.create_task(raw.pong_for(scaled(120)))
        conn = await asyncpg.connect(db_url)
        watcher = await asyncpg.connect(db_url)
        try:
            for _ in range(2):  # twice: a loop that survives once also survives again
                async with conn.transaction():
                    await conn.execute("LOCK TABLE executions IN ACCESS EXCLUSIVE MODE")
                    await _cancel_blocked(watcher, SWEEP_SQL, scaled(10))
                    await _cancel_blocked(watcher, REAPER_SQL, scaled(10))
                # Past a failure's back-off both loops read again (then the lock is gone).
                await asyncio.sleep(1.5)
            async with conn.transaction():
                await conn.execute("LOCK TABLE executions IN ACCESS EXCLUSIVE MODE")
                # Blocked again: so they were still running.
                for pattern in (SWEEP_SQL, REAPER_SQL):
                    await _cancel_blocked(watcher, pattern, scaled(10))
        finally:
            pongs.cancel()
            await conn.close()
            await watcher.close()
            await raw.close()

        # The server still answers: its task group did not end with a loop.
        def healthz() -> int:
            with urllib.request.urlopen(http_url(service, "/healthz"), timeout=10) as resp:
                return int(resp.status)

        assert await asyncio.to_thread(healthz) == 200

"""A cancel is durable (issue 25, item 14): it reaches the daemon after any lost notification.

A client's cancel is a flag in the database; the notification relaying it can miss the daemon
(its link down, the orchestrator's LISTEN connection down, the offer not yet accepted). Each
test loses it one of those ways, through a real ``tally serve`` (in this process, on a real
socket), a real PostgreSQL, and a real ``tallyd`` behind tests/tcpproxy.py or a raw daemon,
and then checks that the job stops early, recorded ``cancelled``, and the ledger invariants.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.server import ServerConnection, serve

from orchestrator.client import TallyClient
from orchestrator.wire import send_many
from shared import protocol as p
from tests.conftest import scaled
from tests.rawdaemon import RawDaemon
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
from tests.tcpproxy import TcpProxy

TURNS = 30
# A daemon reconnects within a second once the proxy lets it (websockets' backoff, shortened).
FAST_RECONNECT = {
    "WEBSOCKETS_BACKOFF_INITIAL_DELAY": "0.3",
    "WEBSOCKETS_BACKOFF_MIN_DELAY": "0.3",
    "WEBSOCKETS_BACKOFF_MAX_DELAY": "1.0",
}
# Leases long enough that a 3 s outage ends inside them: the daemon re-attaches its execution
# (after a lease expiry the job is decided by the reaper, a different path).
LONG_LEASE = {"heartbeat_timeout": 20.0, "lease_timeout": 30.0}


@pytest.fixture
def fast_reconnect() -> Iterator[None]:
    """Daemons started in this test reconnect quickly (their env is this process's)."""
    old = {k: os.environ.get(k) for k in FAST_RECONNECT}
    os.environ.update(FAST_RECONNECT)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _long_job() -> p.JobSpec:
    return p.JobSpec(
        executor="simulated", spec={"prompt": "long", "turns": TURNS, "latencyMs": 200}
    )


async def _calls(db_url: str, job_id: str) -> int:
    rows = await fetch(
        db_url,
        "SELECT count(*) AS n FROM llm_calls c JOIN executions e ON e.id = c.execution_id "
        "WHERE e.job_id = $1",
        job_id,
    )
    return int(rows[0]["n"])


async def _job(db_url: str, job_id: str) -> asyncpg.Record:
    return (await fetch(db_url, "SELECT * FROM jobs WHERE id = $1", job_id))[0]


async def _cancel(service: Any, conn: asyncpg.Connection, job_id: str) -> None:
    """Cancel through the client API and wait until the flag is committed (read on ``conn``)."""
    async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
        await client.cancel(job_id)

        async def flagged() -> bool:
            query = "SELECT cancel_requested FROM jobs WHERE id = $1"
            return bool(await conn.fetchval(query, job_id))

        await wait_for(flagged, scaled(10))


async def _stopped_early(db_url: str, job_id: str, calls_at_cancel: int) -> None:
    """The job ends ``cancelled`` well before its last turn."""

    async def decided() -> bool:
        return (await _job(db_url, job_id))["status"] != "running"

    await wait_for(decided, scaled(20))
    job = await _job(db_url, job_id)
    assert job["status"] == "cancelled", dict(job)
    executions = await fetch(
        db_url, "SELECT status, stop_reason FROM executions WHERE job_id = $1", job_id
    )
    assert [(e["status"], e["stop_reason"]) for e in executions] == [("cancelled", "cancelled")]
    calls = await _calls(db_url, job_id)
    # What it spent up to the cancel, plus what ran while the cancel waited for the daemon
    # to come back, never every turn.
    assert calls_at_cancel <= calls < TURNS - 5, (calls_at_cancel, calls)


@contextlib.asynccontextmanager
async def _listener_down(admin_dsn: str, db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The orchestrator's LISTEN connection is terminated and kept from reconnecting.

    New connections to the test's database are refused meanwhile (``ALLOW_CONNECTIONS
    false``, set from the admin database); the orchestrator's pool keeps those it has, and
    the test reads the database on the connection yielded.
    """
    own = await asyncpg.connect(db_url)
    name = await own.fetchval("SELECT current_database()")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
            "AND (query LIKE 'LISTEN%' OR query = 'SELECT 1')",
            name,
        )
        assert len(pids) == 1, pids  # the one listener of the one orchestrator
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pids[0]["pid"])
        yield own
    finally:
        await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await conn.close()
        await own.close()


@pytest.mark.usefixtures("fast_reconnect")
async def test_cancel_during_link_outage_reaches_daemon_after_reconnect(
    db_url: str, tmp_path: Path
) -> None:
    """A cancel issued while the daemon's link is reset and refused stops the job on reconnect."""
    async with running_service(db_url, **LONG_LEASE) as service:
        async with TcpProxy(service.port) as proxy:
            daemon = start_daemon(proxy.url, tmp_path / "d", log=tmp_path / "d.log")
            try:
                async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                    (job_id,) = await submit_early(client, [_long_job()])

                async def started() -> bool:
                    return await _calls(db_url, job_id) >= 2

                await wait_for(started, scaled(20))
                assert proxy.cut(3.0) >= 1
                conn = await asyncpg.connect(db_url)
                try:
                    await _cancel(service, conn, job_id)
                finally:
                    await conn.close()
                calls_at_cancel = await _calls(db_url, job_id)
                await _stopped_early(db_url, job_id, calls_at_cancel)
                assert proxy.refused >= 1  # the outage really refused a reconnect
                # Re-attached, not lost: the cancel reached the running execution.
                lost = await fetch(
                    db_url, "SELECT count(*) AS n FROM executions WHERE status = 'lost'"
                )
                assert lost[0]["n"] == 0
            finally:
                await stop_daemon_async(daemon)


@pytest.mark.usefixtures("fast_reconnect")
async def test_cancel_while_listener_down_reaches_daemon(
    pg_admin_dsn: str, db_url: str, tmp_path: Path
) -> None:
    """A cancel no listener heard (the LISTEN connection down) still stops the job."""
    async with running_service(db_url, **LONG_LEASE) as service:
        daemon = start_daemon(ws_url(service), tmp_path / "d", log=tmp_path / "d.log")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                (job_id,) = await submit_early(client, [_long_job()])

            async def started() -> bool:
                return await _calls(db_url, job_id) >= 2

            await wait_for(started, scaled(20))
            async with _listener_down(pg_admin_dsn, db_url) as conn:
                await _cancel(service, conn, job_id)
            calls_at_cancel = await _calls(db_url, job_id)
            await _stopped_early(db_url, job_id, calls_at_cancel)
        finally:
            await stop_daemon_async(daemon)


async def test_cancel_between_offer_and_accept_answers_the_accept(
    pg_admin_dsn: str, db_url: str
) -> None:
    """A cancel that no notification relayed before the accept is sent right after it."""
    async with running_service(db_url, **LONG_LEASE) as service:
        raw = RawDaemon(ws_url(service), "raw-1")
        await raw.connect()
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                (job_id,) = await submit_early(client, [p.JobSpec(executor="simulated")])
            offer = await raw.next_of(p.JobOffer, timeout=scaled(10))
            assert offer.payload.job_id == job_id
            async with _listener_down(pg_admin_dsn, db_url) as conn:
                await _cancel(service, conn, job_id)
            await raw.accept(offer)
            cancel = await raw.next_of(p.JobCancel, timeout=scaled(10))
            assert cancel.id == offer.id
            # The daemon stops and reports what it spent; the job is cancelled once.
            await raw.send(
                p.JobResult(
                    id=offer.id,
                    timestamp=p.now_ms(),
                    payload=p.ResultPayload(
                        success=False, stop_reason="cancelled", error_message="cancelled"
                    ),
                )
            )
            ack = await raw.next_of(p.JobAck, timeout=scaled(10))
            assert ack.payload.of == "job:result"
            assert (await _job(db_url, job_id))["status"] == "cancelled"
        finally:
            await raw.close()


async def test_daemon_reports_job_cancelled_before_its_first_step(tmp_path: Path) -> None:
    """An offer and its cancel read in one go still end in a result (stopReason cancelled)."""
    frames: asyncio.Queue[p.DaemonFrame] = asyncio.Queue()
    execution_id, job_id = str(uuid.uuid4()), str(uuid.uuid4())

    async def orchestrator(ws: ServerConnection) -> None:
        register = p.decode_daemon_frame(await ws.recv())
        registered = p.RegisteredPayload(
            heartbeat_interval_ms=1000, offer_timeout_ms=5000, lease_timeout_ms=30000
        )
        await ws.send(p.encode(p.make(p.DaemonRegistered, registered, register.id)).decode())
        offer = p.OfferPayload(
            job_id=job_id,
            attempt=1,
            executor="simulated",
            spec={"prompt": "x", "turns": 5, "latencyMs": 100},
        )
        cancel = p.CancelPayload(reason="cancelled by client")
        # One write: the daemon reads the cancel right after the offer, before the job's task
        # has taken a step.
        await send_many(
            ws,
            [p.make(p.JobOffer, offer, execution_id), p.make(p.JobCancel, cancel, execution_id)],
        )
        async for data in ws:
            await frames.put(p.decode_daemon_frame(data))

    async with serve(orchestrator, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        daemon = start_daemon(f"ws://127.0.0.1:{port}/ws", tmp_path / "d", log=tmp_path / "d.log")
        try:
            async with asyncio.timeout(scaled(20)):
                while not isinstance(frame := await frames.get(), p.JobResult):
                    assert not isinstance(frame, p.JobGeneration), frame  # no call was made
            assert frame.id == execution_id
            assert frame.payload.stop_reason == "cancelled", frame.payload
        finally:
            daemon.kill()  # its result is never acknowledged here: no drain to wait for
            await asyncio.to_thread(daemon.wait)

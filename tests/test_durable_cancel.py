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
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from orchestrator import upkeep
from orchestrator.bench.loadgen import register_frame
from orchestrator.client import TallyClient
from orchestrator.wire import send_many
from shared import protocol as p
from tests.conftest import scaled
from tests.invariants import assert_invariants
from tests.rawdaemon import RawDaemon
from tests.stack import (
    CLIENT_TOKEN,
    DAEMON_TOKEN,
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


@pytest.fixture
def no_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic cancel sweep never runs in this test's orchestrators: a cancel that
    arrives came by the path under test (registration, accept)."""
    monkeypatch.setattr(upkeep, "CANCEL_SWEEP_INTERVAL", 3600.0)


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


@pytest.mark.usefixtures("fast_reconnect", "no_sweep")
async def test_cancel_during_link_outage_reaches_daemon_after_reconnect(
    db_url: str, tmp_path: Path
) -> None:
    """A cancel issued while the daemon's link is reset and refused stops the job on reconnect,
    sent at its registration (the periodic sweep is off)."""
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


@pytest.mark.usefixtures("no_sweep")
async def test_cancel_between_offer_and_accept_answers_the_accept(
    pg_admin_dsn: str, db_url: str
) -> None:
    """A cancel that no notification relayed before the accept is sent right after it (read
    by the accept itself; the periodic sweep is off)."""
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


@pytest.mark.usefixtures("fast_reconnect", "no_sweep")
async def test_cancel_reaches_daemon_that_comes_back_on_another_orchestrator(
    db_url: str, tmp_path: Path
) -> None:
    """A cancel issued through orchestrator A while the daemon's link is down stops the job
    when the daemon comes back on orchestrator B (same database), sent by B's registration."""
    async with (
        running_service(db_url, check_invariants=False, orchestrator_id="a", **LONG_LEASE) as a,
        running_service(db_url, check_invariants=False, orchestrator_id="b", **LONG_LEASE) as b,
        TcpProxy(a.port) as proxy,
    ):
        daemon = start_daemon(proxy.url, tmp_path / "d", log=tmp_path / "d.log")
        try:
            async with TallyClient(ws_url(a), CLIENT_TOKEN) as client:
                (job_id,) = await submit_early(client, [_long_job()])

            async def started() -> bool:
                return await _calls(db_url, job_id) >= 2

            await wait_for(started, scaled(20))
            assert b.parts is not None and not b.parts.dispatcher.daemons
            proxy.target_port = b.port  # the daemon's next link lands on B
            assert proxy.cut(2.0) >= 1
            conn = await asyncpg.connect(db_url)
            try:
                await _cancel(a, conn, job_id)
            finally:
                await conn.close()
            calls_at_cancel = await _calls(db_url, job_id)
            await _stopped_early(db_url, job_id, calls_at_cancel)
            [row] = await fetch(
                db_url,
                "SELECT d.orchestrator_id FROM executions e JOIN daemons d ON d.id = e.daemon_id "
                "WHERE e.job_id = $1",
                job_id,
            )
            assert row["orchestrator_id"] == "b"  # it came back on B, and B told it
        finally:
            await stop_daemon_async(daemon)
    await assert_invariants(db_url)


# A spec this large fills a link whose reader stopped (the socket buffers and the transport's
# write limit) in an offer or two.
BIG_SPEC = {"prompt": "x" * 300_000}


async def _stalled_daemon(url: str, daemon_id: str) -> Any:
    """A daemon link that registers, then reads nothing more once told to: a small receive
    buffer, and websockets' read queue of one message, so the orchestrator's writes block."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    ws = await connect(
        url,
        sock=sock,
        max_queue=1,
        max_size=None,
        additional_headers={"Authorization": f"Bearer {DAEMON_TOKEN}"},
    )
    await ws.send(register_frame(daemon_id, ["stall"], 4))
    registered = p.decode_server_frame(await ws.recv())
    assert isinstance(registered, p.DaemonRegistered), registered
    return ws


async def test_daemon_that_stopped_reading_holds_up_no_lease_renewal(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel for a daemon that stopped reading (its link full) never pauses the lease
    renewals of the other daemons: their leases stay ahead of now while the sweep tries it."""
    monkeypatch.setattr(upkeep, "CANCEL_SWEEP_INTERVAL", 0.5)
    lease = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "lease_timeout": 2.5}
    async with running_service(db_url, check_invariants=False, **lease) as service:
        assert service.parts is not None
        dispatcher = service.parts.dispatcher
        healthy = RawDaemon(ws_url(service), "healthy", capacity=1)
        await healthy.connect()
        stalled = await _stalled_daemon(ws_url(service), "stalled")
        keep_alive: asyncio.Task[None] | None = None
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                (kept_job,) = await submit_early(client, [p.JobSpec(executor="simulated")])
                kept = await healthy.next_of(p.JobOffer, timeout=scaled(10))
                await healthy.accept(kept)
                (stuck_job,) = await submit_early(client, [p.JobSpec(executor="stall")])
                offer = p.decode_server_frame(await asyncio.wait_for(stalled.recv(), 10))
                while not isinstance(offer, p.JobOffer):
                    offer = p.decode_server_frame(await asyncio.wait_for(stalled.recv(), 10))
                assert offer.payload.job_id == stuck_job
                await stalled.send(
                    p.encode(
                        p.JobAccept(id=offer.id, timestamp=p.now_ms(), payload=p.EmptyPayload())
                    ).decode()
                )

                async def pong_without_reading() -> None:
                    while True:  # any frame keeps the link alive; it reads nothing more
                        frame = p.HeartbeatPong(
                            id=str(uuid.uuid4()),
                            timestamp=p.now_ms(),
                            payload=p.PongPayload(active_jobs=1),
                        )
                        await stalled.send(p.encode(frame).decode())
                        await healthy.pong_for(0.4)

                keep_alive = asyncio.create_task(pong_without_reading())
                session = dispatcher.daemons["stalled"]
                # The orchestrator's socket to it with a small send buffer (loopback's grows
                # to megabytes): the link fills with an offer or two, as a slow WAN link does.
                server_sock = session.ws.transport.get_extra_info("socket")
                server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

                async def link_full() -> bool:
                    size = session.ws.transport.get_write_buffer_size()
                    return bool(size > session.ws.write_limit_high)

                for _ in range(4):  # big offers until the orchestrator's writes block
                    await submit_early(client, [p.JobSpec(executor="stall", spec=BIG_SPEC)])
                    with contextlib.suppress(AssertionError):
                        await wait_for(link_full, scaled(3))
                        break
                assert await link_full()
                await client.cancel(stuck_job)
            # The sweep now tries to tell the stalled daemon, every 0.5 s; meanwhile the
            # healthy daemon's lease (2.5 s) must be renewed all along.
            conn = await asyncpg.connect(db_url)
            try:
                loop = asyncio.get_running_loop()
                until = loop.time() + 8.0
                while loop.time() < until:
                    ahead = await conn.fetchval(
                        "SELECT lease_expires_at > now() FROM executions WHERE id = $1",
                        kept.id,
                    )
                    assert ahead, "the healthy daemon's lease lapsed"
                    await asyncio.sleep(0.2)
                status = await conn.fetchval("SELECT status FROM jobs WHERE id = $1", kept_job)
                assert status == "running"
            finally:
                await conn.close()
        finally:
            if keep_alive is not None:
                keep_alive.cancel()
                with contextlib.suppress(BaseException):
                    await keep_alive
            stalled.transport.abort()
            await healthy.close()

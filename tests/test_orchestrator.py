"""The orchestrator service: authentication, dispatch, watch, leases, several orchestrators."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from orchestrator.bench.loadgen import register_frame
from orchestrator.client import TallyClient
from orchestrator.config import ServeSettings
from shared import protocol as p
from shared.errors import ConfigError
from tests.conftest import scaled
from tests.invariants import assert_invariants
from tests.rawdaemon import RawDaemon
from tests.stack import (
    CLIENT_TOKEN,
    DAEMON_TOKEN,
    fetch,
    http_url,
    running_service,
    submit_early,
    ws_url,
)


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0000000000"},
        {"Authorization": f"Bearer {CLIENT_TOKEN}x"},
        {"Authorization": f"Basic {DAEMON_TOKEN}"},
    ],
)
async def test_unauthenticated_refused_with_401(db_url: str, headers: dict[str, str]) -> None:
    """No token or a wrong token: 401 at the handshake, before any frame, and no row written."""
    async with running_service(db_url) as service:
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(service), additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
    assert (await fetch(db_url, "SELECT count(*) AS n FROM daemons"))[0]["n"] == 0


async def test_client_token_cannot_act_as_daemon(db_url: str) -> None:
    """A client token sending daemon:register gets an error and no daemon row."""
    async with running_service(db_url) as service:
        raw = RawDaemon(ws_url(service), "intruder", token=CLIENT_TOKEN)
        with pytest.raises(AssertionError):
            await raw.connect()
        await raw.close()
    assert (await fetch(db_url, "SELECT count(*) AS n FROM daemons"))[0]["n"] == 0


async def test_http_endpoints(db_url: str) -> None:
    """/healthz, /readyz and /metrics answer on the same port; other paths are 404."""
    async with running_service(db_url) as service:
        assert (await asyncio.to_thread(get, http_url(service, "/healthz")))[0] == 200
        assert (await asyncio.to_thread(get, http_url(service, "/readyz")))[0] == 200
        status, body = await asyncio.to_thread(get, http_url(service, "/metrics"))
        assert status == 200 and "tally_daemons_connected" in body
        assert (await asyncio.to_thread(get, http_url(service, "/nope")))[0] == 404


def test_refuses_to_start_without_tokens() -> None:
    """No tokens: refused unless --insecure on loopback."""
    with pytest.raises(ConfigError, match="no tokens"):
        ServeSettings(database_url="x").validate()
    with pytest.raises(ConfigError, match="loopback"):
        ServeSettings(database_url="x", host="0.0.0.0", insecure=True).validate()
    ServeSettings(database_url="x", insecure=True).validate()


async def test_offer_to_the_only_capable_daemon_and_watch(db_url: str) -> None:
    """A job goes to the daemon advertising its executor, and the client sees it running."""
    async with running_service(db_url) as service:
        other = RawDaemon(ws_url(service), "other", executors=["openai"])
        capable = RawDaemon(ws_url(service), "capable", executors=["simulated"])
        await other.connect()
        await capable.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(client, [p.JobSpec(executor="simulated")])
            await client.watch([job_id])
            offer = await capable.next_of(p.JobOffer)
            assert offer.payload.job_id == job_id
            await capable.accept(offer)
            updates = client.updates()
            status = "queued"
            while status == "queued":  # the watch starts with the current status
                status = (await asyncio.wait_for(updates.__anext__(), 10)).status
            assert status == "running"
            await capable.finish(offer, tokens=7)
            final = await asyncio.wait_for(updates.__anext__(), 10)
            while final.status == "running":
                final = await asyncio.wait_for(updates.__anext__(), 10)
            assert final.status == "succeeded"
            assert isinstance(final.totals, p.JobTotals) and final.totals.input_tokens == 7
        with pytest.raises(asyncio.TimeoutError):
            await other.next_of(p.JobOffer, timeout=0.5)
        await other.close()
        await capable.close()


async def test_idempotent_submit(db_url: str) -> None:
    """A retried submit with the same idempotency key returns the same job."""
    async with running_service(db_url) as service:
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            spec = p.JobSpec(executor="simulated", idempotency_key="once")
            first = await submit_early(client, [spec])
            again = await submit_early(client, [spec, spec])
    assert first == again[:1] == again[1:]
    assert (await fetch(db_url, "SELECT count(*) AS n FROM jobs"))[0]["n"] == 1


async def test_silent_daemon_dropped_and_job_rerun(db_url: str) -> None:
    """A daemon that stops answering is dropped (4001); its execution is lost and re-run."""
    async with running_service(db_url, heartbeat_timeout=1.0, lease_timeout=2.0) as service:
        silent = RawDaemon(ws_url(service), "silent")
        await silent.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(client, [p.JobSpec(executor="simulated")])
            offer = await silent.next_of(p.JobOffer)
            await silent.accept(offer)
            assert silent.ws is not None
            await asyncio.sleep(scaled(1.5))  # no pongs: past the 1 s heartbeat deadline
            with pytest.raises(ConnectionClosed):
                while True:
                    await silent.ws.recv()
            assert silent.ws.close_code == 4001
            rescuer = RawDaemon(ws_url(service), "rescuer")
            await rescuer.connect()
            second = await rescuer.next_of(p.JobOffer, timeout=scaled(10))
            assert second.payload.job_id == job_id and second.payload.attempt == 2
            await rescuer.accept(second)
            await rescuer.finish(second)
            finals = await client.wait([job_id], timeout=10)
            assert finals[job_id].status == "succeeded"
            await rescuer.close()
    rows = await fetch(db_url, "SELECT daemon_id, status FROM executions ORDER BY attempt")
    assert [(r["daemon_id"], r["status"]) for r in rows] == [
        ("silent", "lost"),
        ("rescuer", "succeeded"),
    ]


async def test_reconnect_inside_lease_keeps_job(db_url: str) -> None:
    """A daemon that reconnects inside the lease and lists its execution keeps it."""
    async with running_service(db_url, heartbeat_timeout=1.0, lease_timeout=2.0) as service:
        raw = RawDaemon(ws_url(service), "flaky")
        await raw.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(client, [p.JobSpec(executor="simulated")])
            offer = await raw.next_of(p.JobOffer)
            await raw.accept(offer)
            await asyncio.sleep(0.2)
            await raw.close()
            await asyncio.sleep(0.5)  # inside the 2 s lease
            registered = await raw.connect(inflight=[(offer.id, job_id)])
            assert registered.payload.resumed == [offer.id]
            await raw.pong_for(scaled(2.5))  # past the original lease: pongs extend it
            await raw.finish(offer)
            finals = await client.wait([job_id], timeout=10)
            assert finals[job_id].status == "succeeded"
            await raw.close()
    rows = await fetch(db_url, "SELECT status FROM executions")
    assert [r["status"] for r in rows] == ["succeeded"]


async def test_superseded_connection_closed_4002(db_url: str) -> None:
    """A second connection of the same daemon id closes the first with 4002."""
    async with running_service(db_url) as service:
        first = RawDaemon(ws_url(service), "twin")
        await first.connect()
        second = RawDaemon(ws_url(service), "twin")
        await second.connect()
        assert first.ws is not None
        with pytest.raises(ConnectionClosed):
            while True:
                await first.ws.recv()
        assert first.ws.close_code == 4002
        await second.close()


async def test_incompatible_protocol_closed_4003(db_url: str) -> None:
    """A daemon speaking another protocol major is closed with 4003."""
    async with running_service(db_url) as service:
        async with connect(
            ws_url(service), additional_headers={"Authorization": f"Bearer {DAEMON_TOKEN}"}
        ) as ws:
            await ws.send(register_frame("old", capacity=1, protocol_version="2.0"))
            error = p.decode_server_frame(await ws.recv())
            assert isinstance(error, p.Error) and error.payload.code == "incompatible_protocol"
            await ws.wait_closed()
            assert ws.close_code == 4003


async def test_two_orchestrators_dispatch_each_job_once(db_url: str) -> None:
    """Two orchestrators on one database, 200 jobs, daemons on both: each job offered once."""
    async with (
        running_service(db_url, check_invariants=False) as a,
        running_service(db_url, check_invariants=False) as b,
    ):
        daemons = [
            RawDaemon(ws_url(svc), f"d-{i}", capacity=50) for i, svc in enumerate([a, a, b, b])
        ]
        for d in daemons:
            await d.connect()
        offers: list[p.JobOffer] = []

        async def work(d: RawDaemon) -> None:
            while True:
                try:
                    offer = await d.next_of(p.JobOffer, timeout=3)
                except TimeoutError:
                    return
                offers.append(offer)
                await d.accept(offer)
                await d.finish(offer)

        async with TallyClient(ws_url(b), CLIENT_TOKEN) as client:
            ids = await submit_early(client, [p.JobSpec(executor="simulated") for _ in range(200)])
            await asyncio.gather(*(work(d) for d in daemons))
            finals = await client.wait(ids, timeout=scaled(30))
        for d in daemons:
            await d.close()
        # The two processes' counters together equal the ledger they both wrote.
        await assert_invariants(db_url, [http_url(a, "/metrics"), http_url(b, "/metrics")])
    assert len(offers) == 200
    assert len({o.payload.job_id for o in offers}) == 200
    assert {f.status for f in finals.values()} == {"succeeded"}
    per = await fetch(db_url, "SELECT count(DISTINCT daemon_id) AS n FROM executions")
    assert per[0]["n"] >= 2


async def test_cancel_reaches_the_running_daemon(db_url: str) -> None:
    """job:cancel from a client reaches the daemon running the job, and the job is cancelled."""
    async with running_service(db_url) as service:
        raw = RawDaemon(ws_url(service), "worker")
        await raw.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await submit_early(client, [p.JobSpec(executor="simulated")])
            offer = await raw.next_of(p.JobOffer)
            await raw.accept(offer)
            await asyncio.sleep(0.2)
            await client.cancel(job_id)
            cancel = await raw.next_of(p.JobCancel)
            assert cancel.id == offer.id
            await raw.send(
                p.JobResult(
                    id=offer.id,
                    timestamp=p.now_ms(),
                    payload=p.ResultPayload(
                        success=False, stop_reason="cancelled", input_tokens=3, output_tokens=1
                    ),
                )
            )
            finals = await client.wait([job_id], timeout=10)
            assert finals[job_id].status == "cancelled"
            await raw.close()


async def test_oversized_frame_closed_1009(db_url: str) -> None:
    """A frame above the cap closes the connection with 1009."""
    async with running_service(db_url, max_frame_bytes=4096) as service:
        raw = RawDaemon(ws_url(service), "big")
        await raw.connect()
        assert raw.ws is not None
        await raw.ws.send("x" * 10_000)
        with pytest.raises(ConnectionClosed):
            while True:
                await raw.ws.recv()
        assert raw.ws.close_code == 1009


async def test_tls_end_to_end(db_url: str, tmp_path: Path) -> None:
    """--tls-cert/--tls-key serve wss://, and a client trusting the CA completes a job."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    async with running_service(db_url, tls_cert=cert, tls_key=key) as service:
        ctx = ssl.create_default_context(cafile=str(cert))
        url = f"wss://127.0.0.1:{service.port}/ws"
        async with connect(
            url, ssl=ctx, additional_headers={"Authorization": f"Bearer {DAEMON_TOKEN}"}
        ) as ws:
            await ws.send(register_frame("tls"))
            assert isinstance(p.decode_server_frame(await ws.recv()), p.DaemonRegistered)
        with pytest.raises(ssl.SSLError):
            async with connect(url, ssl=ssl.create_default_context()):
                pass


async def test_unacked_window_waits_for_room() -> None:
    """A daemon's reader takes a place per frame and waits once all are taken, until an
    answer gives one back."""
    from orchestrator.sessions import Window
    from shared.aio import within

    window = Window(2)
    await window.acquire()
    await window.acquire()
    third = asyncio.ensure_future(window.acquire())
    await asyncio.sleep(0.01)
    assert not third.done() and window.free == 0
    window.release()
    await within(third, 1)
    assert window.free == 0
    window.release()
    window.release()
    assert window.free == 2


def test_serve_collects_garbage_less_often() -> None:
    """`tally serve` freezes start-up objects and raises the young-generation threshold."""
    import gc

    from orchestrator.cli.serve import collect_less_often

    before = gc.get_threshold()
    try:
        collect_less_often()
        assert gc.get_threshold() == (50_000, 50, 100)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

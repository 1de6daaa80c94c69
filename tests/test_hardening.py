"""Hostile peers and bad days: every bad frame answered alone, every other peer still served.

One test per defect of issue 13, each through a real ``tally serve`` (served in this process
on a real socket), real WebSocket peers and a real PostgreSQL, ending with the invariants.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.outbox import Outbox, result_key
from orchestrator.bench.loadgen import register_frame
from orchestrator.client import TallyClient
from orchestrator.config import ServeSettings
from shared import protocol as p
from shared.errors import ConfigError
from tests.conftest import scaled
from tests.invariants import assert_invariants, scrape_sync
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

OTHER_TOKEN = "daemon-token-other-456789"
BOUND_TOKEN = "daemon-token-bound-456789"


async def _submit(service: Any, n: int = 1, **fields: Any) -> list[str]:
    async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
        fields.setdefault("executor", "simulated")
        return await submit_early(client, [p.JobSpec(**fields) for _ in range(n)])


async def _offer(daemon: RawDaemon) -> p.JobOffer:
    offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
    assert isinstance(offer, p.JobOffer)
    return offer


async def _bystander_served(service: Any, name: str = "bystander") -> None:
    """Another daemon connects, takes a job, and its result is recorded and acknowledged."""
    other = RawDaemon(ws_url(service), name, executors=["bystander"], capacity=1)
    await other.connect()
    await _submit(service, executor="bystander")
    offer = await _offer(other)
    await other.accept(offer)
    await other.finish(offer, tokens=3)
    await other.close()


def _generation(eid: str, seq: int = 0, **fields: Any) -> p.JobGeneration:
    fields.setdefault("provider", "simulated")
    return p.JobGeneration(
        id=eid, timestamp=p.now_ms(), payload=p.GenerationPayload(seq=seq, **fields)
    )


def _result(eid: str, **fields: Any) -> p.JobResult:
    return p.JobResult(id=eid, timestamp=p.now_ms(), payload=p.ResultPayload(**fields))


async def _raw_frame(daemon: RawDaemon, text: str) -> None:
    assert daemon.ws is not None
    await daemon.ws.send(text)


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _metrics(service: Any) -> dict[str, list[tuple[dict[str, str], float]]]:
    return await asyncio.to_thread(scrape_sync, http_url(service, "/metrics"))


# --- 1. a value the database cannot index never wedges the writer ------------------------------


async def test_model_name_longer_than_an_index_holds_is_refused_at_decode(db_url: str) -> None:
    """A 3,000-character model name is refused with its path; the link and others go on."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        await _submit(service)
        offer = await _offer(daemon)
        await daemon.accept(offer)
        long_name = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(3000))
        await daemon.send(_generation(offer.id, response_model=long_name, input_tokens=5))
        error = await daemon.next_of(p.Error)
        assert error.payload.code == "invalid_frame"
        assert error.payload.path == "$.payload.responseModel"
        entry = {
            "model": long_name,
            "inputTokens": 1,
            "outputTokens": 1,
            "cacheReadInputTokens": 0,
            "cacheCreationInputTokens": 0,
            "costUsd": 0,
        }
        frame = {"type": "job:result", "id": offer.id, "timestamp": p.now_ms()}
        frame["payload"] = {"success": True, "modelUsage": [entry]}
        await _raw_frame(daemon, json.dumps(frame))
        error = await daemon.next_of(p.Error)
        assert error.payload.path == "$.payload.modelUsage[0].model"
        await daemon.finish(offer, tokens=4)  # the same link is still served
        await _bystander_served(service)
        assert (await fetch(db_url, "SELECT count(*) AS n FROM llm_calls"))[0]["n"] == 2
        await assert_invariants(db_url, http_url(service, "/metrics"))


async def test_a_frame_the_database_refuses_is_refused_alone_and_named(db_url: str) -> None:
    """Calls whose running sum passes BIGINT: the overflowing call is refused alone (an error
    naming it, so its daemon drops it); the calls before it and after it are recorded."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        await _submit(service)
        offer = await _offer(daemon)
        await daemon.accept(offer)
        big = p.MAX_COUNTER
        n = 1025  # 1,024 of them fit in BIGINT; the 1,025th does not
        for seq in range(n):
            await daemon.send(_generation(offer.id, seq, input_tokens=big))
        acks: set[int] = set()
        refused: list[p.Error] = []
        while len(acks) + len(refused) < n:
            frame = await daemon.next_of(p.JobAck | p.Error, timeout=scaled(30))  # type: ignore[arg-type]
            if isinstance(frame, p.JobAck):
                acks.add(int(frame.payload.seq or 0))
            else:
                refused.append(frame)
        assert len(refused) == 1 and len(acks) == n - 1
        assert refused[0].payload.code == "refused_by_database"
        assert refused[0].payload.of == "job:generation"
        assert refused[0].payload.seq not in acks
        total = await fetch(db_url, "SELECT input_tokens FROM executions")
        assert total[0]["input_tokens"] == big * (n - 1)
        await _bystander_served(service)
        await assert_invariants(db_url, http_url(service, "/metrics"))


async def test_readyz_reports_a_writer_that_cannot_commit(db_url: str) -> None:
    """A server-side error (a missing table) is retried, never refused: /readyz turns 503
    naming the writer, and once the table is back the frame is recorded and acknowledged."""
    async with running_service(db_url, writer_stall_timeout=0.3) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        await _submit(service)
        offer = await _offer(daemon)
        await daemon.accept(offer)
        await fetch(db_url, "ALTER TABLE llm_calls RENAME TO llm_calls_away")
        try:
            await daemon.send(_generation(offer.id, input_tokens=5))
            deadline = time.monotonic() + scaled(10)
            while True:
                code, body = await asyncio.to_thread(_status, http_url(service, "/readyz"))
                if code == 503 and "writer" in body:
                    break
                assert time.monotonic() < deadline, (code, body)
                await asyncio.sleep(0.1)
        finally:
            await fetch(db_url, "ALTER TABLE llm_calls_away RENAME TO llm_calls")
        ack = await daemon.next_of(p.JobAck, timeout=scaled(15))
        assert ack.payload.of == "job:generation"
        deadline = time.monotonic() + scaled(10)
        while (await asyncio.to_thread(_status, http_url(service, "/readyz")))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await fetch(db_url, "SELECT count(*) AS n FROM llm_calls"))[0]["n"] == 1


# --- 2. --insecure never off loopback, and never without a token when tokens exist ------------


def test_insecure_is_refused_off_loopback_even_with_tokens() -> None:
    """`--insecure` on 0.0.0.0 is a configuration error whatever tokens are configured."""
    with pytest.raises(ConfigError, match="loopback"):
        ServeSettings(
            database_url="x", host="0.0.0.0", insecure=True, daemon_tokens=(DAEMON_TOKEN,)
        ).validate()


async def test_insecure_with_tokens_still_needs_a_token(db_url: str) -> None:
    """With tokens configured, a peer without one gets 401 even in insecure mode; a peer with
    one is served."""
    async with running_service(db_url, insecure=True) as service:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(service)):
                pass
        assert refused.value.response.status_code == 401
        await _bystander_served(service)
        assert (await fetch(db_url, "SELECT count(*) AS n FROM daemons"))[0]["n"] == 1


# --- 3. counters equal the ledger whatever the models of calls and entries --------------------


async def test_entry_under_another_model_than_its_calls_counted_once(db_url: str) -> None:
    """Steps under the API's model and an aggregate under the requested model (the
    claude-agent case): tally_tokens_total holds 1,000, as `executions` does, not 2,000."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        await _submit(service, model="claude-sonnet-4-6")
        offer = await _offer(daemon)
        await daemon.accept(offer)
        await daemon.send(
            _generation(offer.id, response_model="claude-sonnet-4-6-20261001", input_tokens=1000)
        )
        entry = p.ModelUsage(
            model="claude-sonnet-4-6",
            input_tokens=1000,
            output_tokens=0,
            cache_read_input_tokens=0,
            cache_creation_input_tokens=0,
            cost_usd=0.0,
        )
        await daemon.send(_result(offer.id, success=True, model_usage=[entry]))
        while (await daemon.next_of(p.JobAck)).payload.of != "job:result":
            pass
        metrics = await _metrics(service)
        counted = sum(v for labels, v in metrics["tally_tokens_total"] if labels["type"] == "input")
        assert counted == 1000
        assert (await fetch(db_url, "SELECT input_tokens FROM executions"))[0][0] == 1000
        await assert_invariants(db_url, http_url(service, "/metrics"))


# --- 4 and 13. one decider per job; late usage re-announced -----------------------------------


async def _reaped_offer_then_rerun(service: Any, db_url: str) -> tuple[str, str]:
    """Daemon ``slow`` lets its offer time out (reaped as rejected) and leaves; ``fast`` runs
    the job. Returns the reaped execution's id and the job's id."""
    slow = RawDaemon(ws_url(service), "slow", capacity=1)
    await slow.connect()
    [job_id] = await _submit(service)
    first = await _offer(slow)

    async def reaped() -> bool:
        rows = await fetch(db_url, "SELECT status FROM executions WHERE id = $1", first.id)
        return bool(rows[0]["status"] == "rejected")

    deadline = time.monotonic() + scaled(15)
    while not await reaped():
        assert time.monotonic() < deadline
        await slow.pong_for(0.1)
    await slow.close()  # before the re-queued job's backoff ends
    fast = RawDaemon(ws_url(service), "fast", capacity=1)
    await fast.connect()
    second = await _offer(fast)
    assert second.payload.job_id == job_id
    await fast.accept(second)
    await fast.finish(second, tokens=10)
    await fast.close()
    return first.id, job_id


async def test_late_result_of_a_reaped_offer_never_decides_the_job(db_url: str) -> None:
    """An accept after the offer was reaped is answered not_assigned (naming job:accept);
    the late result is kept as usage but the job stays decided by the attempt that ran it."""
    async with running_service(db_url, offer_timeout=0.5, requeue_backoff=1.5) as service:
        eid, job_id = await _reaped_offer_then_rerun(service, db_url)
        slow = RawDaemon(ws_url(service), "slow", capacity=0)
        await slow.connect()
        await slow.send(p.JobAccept(id=eid, timestamp=p.now_ms(), payload=p.EmptyPayload()))
        error = await slow.next_of(p.Error)
        assert (error.payload.code, error.payload.of) == ("not_assigned", "job:accept")
        await slow.send(_generation(eid, input_tokens=7, output_tokens=7))
        await slow.send(_result(eid, success=False, error_message="late"))
        while (await slow.next_of(p.JobAck)).payload.of != "job:result":
            pass
        rows = await fetch(
            db_url, "SELECT id, status, input_tokens FROM executions ORDER BY offered_at"
        )
        assert [r["status"] for r in rows] == ["rejected", "succeeded"]
        job = await fetch(db_url, "SELECT status, input_tokens FROM jobs WHERE id = $1", job_id)
        assert job[0]["status"] == "succeeded"
        assert job[0]["input_tokens"] == 17  # the late attempt's usage is in the ledger
        await assert_invariants(db_url, http_url(service, "/metrics"))


async def test_late_usage_after_a_job_is_decided_is_sent_to_watchers(db_url: str) -> None:
    """When a reaped attempt's calls arrive after the job finished, its totals are re-summed
    and a job:update with the new totals reaches the watching client."""
    async with running_service(db_url, offer_timeout=0.5, requeue_backoff=1.5) as service:
        eid, job_id = await _reaped_offer_then_rerun(service, db_url)
        slow = RawDaemon(ws_url(service), "slow", capacity=0)
        await slow.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            await client.watch([job_id])
            updates = client.updates()
            first = await asyncio.wait_for(updates.__anext__(), scaled(10))
            assert first.status == "succeeded"
            assert isinstance(first.totals, p.JobTotals) and first.totals.input_tokens == 10
            await slow.send(_generation(eid, input_tokens=5))
            await slow.next_of(p.JobAck)
            later = await asyncio.wait_for(updates.__anext__(), scaled(10))
            assert isinstance(later.totals, p.JobTotals) and later.totals.input_tokens == 15
        await assert_invariants(db_url, http_url(service, "/metrics"))


# --- 5. every label from frames or clients is bounded ----------------------------------------


async def test_labels_from_frames_and_clients_are_capped(db_url: str) -> None:
    """Distinct providers, finish reasons and queues past the cap collapse into `other`, and
    the overflow is counted per label."""
    async with running_service(db_url, label_cap=3) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        await _submit(service)
        offer = await _offer(daemon)
        await daemon.accept(offer)
        for seq in range(20):
            await daemon.send(
                _generation(
                    offer.id,
                    seq,
                    provider=f"prov-{seq}",
                    finish_reason=f"why-{seq}",
                    input_tokens=1,
                )
            )
        for _ in range(20):
            await daemon.next_of(p.JobAck)
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            await submit_early(
                client, [p.JobSpec(executor="nobody-runs-this", queue=f"q-{q}") for q in range(10)]
            )
        await asyncio.sleep(scaled(1.0))  # two snapshot intervals
        metrics = await _metrics(service)
        providers = {labels["provider"] for labels, _ in metrics["tally_llm_calls_total"]}
        reasons = {labels["finish_reason"] for labels, _ in metrics["tally_llm_calls_total"]}
        queues = {labels["queue"] for labels, _ in metrics["tally_jobs_queued"]}
        assert len(providers) == 4 and "other" in providers
        assert len(reasons) == 4 and "other" in reasons
        assert len(queues) <= 4 and "other" in queues
        overflow = {
            labels["label"]: v for labels, v in metrics["tally_label_values_overflow_total"]
        }
        assert overflow["provider"] == 17 and overflow["finish_reason"] == 17
        assert sum(v for labels, v in metrics["tally_jobs_queued"]) == 10
        await assert_invariants(db_url, http_url(service, "/metrics"))


# --- 6. daemon tokens bound to daemon ids ----------------------------------------------------


async def test_daemon_ids_bound_to_tokens(db_url: str) -> None:
    """An id bound to a token is refused to other tokens, a bound token to other ids, and an
    unbound token cannot take over an id a connected daemon of another token holds."""
    async with running_service(
        db_url,
        daemon_tokens=(DAEMON_TOKEN, OTHER_TOKEN),
        daemon_token_bindings=(("alpha", BOUND_TOKEN),),
    ) as service:
        for daemon_id, token in (("alpha", DAEMON_TOKEN), ("beta", BOUND_TOKEN)):
            impostor = RawDaemon(ws_url(service), daemon_id, token=token)
            with pytest.raises((AssertionError, ConnectionClosed)):
                await impostor.connect()
        real = RawDaemon(ws_url(service), "alpha", token=BOUND_TOKEN, capacity=0)
        await real.connect()
        held = RawDaemon(ws_url(service), "gamma", token=DAEMON_TOKEN, capacity=1)
        await held.connect()
        thief = await connect(
            ws_url(service), additional_headers={"Authorization": f"Bearer {OTHER_TOKEN}"}
        )
        await thief.send(register_frame("gamma", ["simulated"], 1))
        error = p.decode_server_frame(await asyncio.wait_for(thief.recv(), scaled(10)))
        assert isinstance(error, p.Error) and error.payload.code == "forbidden"
        # the real holder is still connected and served
        await _submit(service)
        offer = await _offer(held)
        await held.accept(offer)
        await held.finish(offer)
        rows = await fetch(db_url, "SELECT daemon_id FROM executions")
        assert [r["daemon_id"] for r in rows] == ["gamma"]
        await real.close()
        await held.close()
        await assert_invariants(db_url, http_url(service, "/metrics"))


# --- 7, 8, 9. deep JSON, NUL characters, numbers past what the ledger holds --------------------


async def test_deeply_nested_json_is_answered_and_the_link_stays(db_url: str) -> None:
    """JSON nested 1,000 deep (inside an ignored key) gets an error frame; no 1011 close."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        deep = "[" * 1000 + "]" * 1000
        eid = p.new_id()
        await _raw_frame(
            daemon,
            f'{{"type":"job:result","id":"{eid}","timestamp":1,'
            f'"payload":{{"success":true,"ignored":{deep}}}}}',
        )
        error = await daemon.next_of(p.Error)
        assert error.payload.code == "invalid_frame" and "nested" in error.payload.message
        await _bystander_served(service)
        await daemon.pong_for(0.2)  # still connected and answering pings
        assert daemon.ws is not None and daemon.ws.close_code is None


async def test_nul_characters_in_a_registration_are_stored_as_replacement(db_url: str) -> None:
    """A NUL in hostname and labels no longer closes the link 1011: the daemon registers and
    the database holds U+FFFD."""
    async with running_service(db_url) as service:
        assert service.port is not None
        ws = await connect(
            ws_url(service), additional_headers={"Authorization": f"Bearer {DAEMON_TOKEN}"}
        )
        frame = p.DaemonRegister(
            id=p.new_id(),
            timestamp=p.now_ms(),
            payload=p.RegisterPayload(
                daemon_id="nul",
                hostname="host\x00name",
                version="1\x00",
                protocol_version=p.PROTOCOL_VERSION,
                executors=[],
                max_concurrent_jobs=0,
                labels={"team\x00": "search\x00"},
            ),
        )
        await ws.send(p.encode(frame).decode())
        answer = p.decode_server_frame(await asyncio.wait_for(ws.recv(), scaled(10)))
        assert isinstance(answer, p.DaemonRegistered)
        row = (await fetch(db_url, "SELECT hostname, labels::text FROM daemons"))[0]
        assert row["hostname"] == "host\ufffdname"
        assert json.loads(row["labels"]) == {"team\ufffd": "search\ufffd"}
        await ws.close()
        await _bystander_served(service)


async def test_cost_past_the_bound_is_refused_and_counters_stay_finite(db_url: str) -> None:
    """costUsd 1e308 is refused at decode with its path; counters never become +Inf."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        await _submit(service)
        offer = await _offer(daemon)
        await daemon.accept(offer)
        for seq in range(2):
            text = p.encode(_generation(offer.id, seq, input_tokens=1, cost_usd=1.0)).decode()
            await _raw_frame(daemon, text.replace('"costUsd":1.0', '"costUsd":1e308'))
            error = await daemon.next_of(p.Error)
            assert error.payload.path == "$.payload.costUsd"
        await daemon.finish(offer)
        metrics = await _metrics(service)
        assert all(v < 1e9 for _, v in metrics.get("tally_cost_usd_total", []))
        await assert_invariants(db_url, http_url(service, "/metrics"))


# --- 10, 12. clients: clear errors, case of the scheme, idle timeout --------------------------


async def test_client_never_sees_database_text(db_url: str) -> None:
    """A client request the database cannot carry out is answered with a code and a message
    of ours, never the database's error text; NULs in a submission are stored as U+FFFD."""
    async with running_service(db_url) as service:
        # An executor of the operator's own: its spec is free JSON (a built-in's is checked).
        [job_id] = await _submit(
            service, executor="own", labels={"team": "a\x00b"}, spec={"k\x00": "v\x00"}
        )
        row = (await fetch(db_url, "SELECT labels::text, spec::text FROM jobs"))[0]
        assert "\ufffd" in row["labels"] and "\ufffd" in row["spec"]
        await fetch(db_url, "ALTER TABLE jobs RENAME TO jobs_away")
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                with pytest.raises(Exception) as failed:
                    await submit_early(client, [p.JobSpec(executor="simulated")])
        finally:
            await fetch(db_url, "ALTER TABLE jobs_away RENAME TO jobs")
        text = str(failed.value)
        assert "internal_error" in text and "relation" not in text and "jobs_away" not in text
        assert job_id


async def test_lowercase_bearer_is_accepted_and_idle_clients_are_closed(db_url: str) -> None:
    """`bearer` is accepted (HTTP schemes are case-insensitive); a client that watches
    nothing and sends nothing is closed after the idle timeout."""
    # Watching a job keeps it open; an idle client without watches is closed.
    async with running_service(db_url, client_idle_timeout=0.4) as service:
        ws = await connect(
            ws_url(service), additional_headers={"Authorization": f"bearer {CLIENT_TOKEN}"}
        )
        submit = p.JobSubmit(
            id=p.new_id(),
            timestamp=p.now_ms(),
            payload=p.SubmitPayload(
                jobs=[p.JobSpec(executor="simulated")], allow_unknown_executor=True
            ),
        )
        await ws.send(p.encode(submit).decode())
        answer = p.decode_server_frame(await ws.recv())
        assert isinstance(answer, p.JobSubmitted)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), scaled(10))
        assert ws.close_code == 1001


# --- 14. a daemon without a connection stops at once on SIGTERM -------------------------------


def test_daemon_without_connection_exits_at_once_and_keeps_its_outbox(tmp_path: Path) -> None:
    """SIGTERM with unacknowledged frames and no orchestrator: tallyd exits without waiting
    for acks that cannot come (10 s), and its outbox still holds the frames."""
    state = tmp_path / "state"
    outbox = Outbox(state)
    eid = p.new_id()
    outbox.put(result_key(eid), eid, p.encode(_result(eid, success=True)))
    outbox.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon",
            "--orchestrator",
            "ws://127.0.0.1:9/ws",
            "--token",
            DAEMON_TOKEN,
            "--state-dir",
            str(state),
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(scaled(30)) == 0
    assert time.monotonic() - started < 5, "waited for acks with no connection"
    kept = Outbox(state)
    assert len(kept) == 1
    kept.close()


async def test_daemon_drops_frames_the_orchestrator_will_never_accept(
    db_url: str, tmp_path: Path
) -> None:
    """A real tallyd resending a result for an execution that is not its own (not_assigned)
    and a call the ledger cannot hold (refused_by_database) drops both from its outbox, as
    it would on an ack, instead of resending them after every reconnect; a good call is
    recorded and acknowledged."""
    import asyncpg

    from daemon.outbox import generation_key
    from orchestrator.bench.seed import seed_running_executions

    conn = await asyncpg.connect(db_url)
    try:
        [near_full, good] = (await seed_running_executions(conn, ["w1"], 2))["w1"]
        # An execution whose running total is already near BIGINT's maximum (job alike).
        await conn.execute(
            "UPDATE executions SET input_tokens = $2, num_turns = 1 WHERE id = $1",
            near_full,
            2**63 - 10,
        )
        await conn.execute(
            "UPDATE jobs SET input_tokens = $2, num_turns = 1 "
            "WHERE id = (SELECT job_id FROM executions WHERE id = $1)",
            near_full,
            2**63 - 10,
        )
    finally:
        await conn.close()
    state = tmp_path / "state"
    outbox = Outbox(state)
    stranger = p.new_id()
    frames = {
        result_key(stranger): (stranger, _result(stranger, success=True)),
        generation_key(near_full, 0): (near_full, _generation(near_full, 0, input_tokens=100)),
        generation_key(good, 0): (good, _generation(good, 0, input_tokens=7)),
    }
    for key, (eid, frame) in frames.items():
        outbox.put(key, eid, p.encode(frame))
    outbox.close()
    async with running_service(db_url) as service:
        from tests.stack import start_daemon, stop_daemon_async

        proc = start_daemon(ws_url(service), state, "--daemon-id", "w1", concurrency=1)
        try:
            deadline = time.monotonic() + scaled(20)
            while True:
                probe = Outbox(state)
                left = len(probe)
                probe.close()
                if left == 0:
                    break
                assert time.monotonic() < deadline, f"{left} frames still in the outbox"
                await asyncio.sleep(0.2)
        finally:
            assert await stop_daemon_async(proc) == 0
        calls = await fetch(db_url, "SELECT execution_id::text AS e FROM llm_calls")
        assert [r["e"] for r in calls] == [good]
        metrics = await _metrics(service)
        rejected = {labels["reason"]: v for labels, v in metrics["tally_frames_rejected_total"]}
        assert rejected["refused_by_database"] == 1 and rejected["not_assigned"] == 1


async def test_nul_characters_in_a_reject_are_stored_as_replacement(db_url: str) -> None:
    """A job:reject whose reason and message hold NUL re-queues the job; the link stays."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        await _submit(service)
        offer = await _offer(daemon)
        reject = p.JobReject(
            id=offer.id,
            timestamp=p.now_ms(),
            payload=p.RejectPayload(reason="odd\x00reason", message="m\x00"),
        )
        await daemon.send(reject)
        await daemon.pong_for(0.5)
        rows = await fetch(db_url, "SELECT status, error FROM executions ORDER BY offered_at")
        assert rows[0]["status"] == "rejected" and "odd\ufffdreason" in rows[0]["error"]
        job = (await fetch(db_url, "SELECT status FROM jobs"))[0]["status"]
        assert job in ("queued", "running")  # back in the queue, perhaps offered again
        assert daemon.ws is not None and daemon.ws.close_code is None
        await _bystander_served(service)

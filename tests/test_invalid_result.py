"""An invalid ``job:result`` still ends its attempt (issue 25, the rule under items 1-4).

Orchestrator side through a real ``tally serve`` (in this process, real socket, real
PostgreSQL) and raw protocol daemons; daemon side through a real ``tallyd`` process against a
scripted orchestrator on a real socket that refuses its frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, ClassVar

from websockets.asyncio.server import ServerConnection, serve

from orchestrator.client import TallyClient
from shared import protocol as p
from shared.limits import MAX_TEXT
from shared.replies import error_frame
from shared.specs import SpecError
from tests.conftest import scaled
from tests.rawdaemon import RawDaemon
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    running_service,
    start_daemon,
    stop_daemon_async,
    submit_early,
    ws_url,
)


async def _submit(service: Any, **fields: Any) -> str:
    async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
        [job_id] = await submit_early(client, [p.JobSpec(executor="simulated", **fields)])
        return job_id


def _oversized_result(eid: str) -> p.JobResult:
    """A result the decoder refuses: its error text past the wire's 65,536 characters (built
    without the daemon's fitting, as an old or hostile daemon would)."""
    return p.JobResult(
        id=eid,
        timestamp=p.now_ms(),
        payload=p.ResultPayload(
            success=False, error_message="E" * 70_000, input_tokens=999, output_tokens=999
        ),
    )


def _call(eid: str, tokens: int) -> p.JobGeneration:
    return p.JobGeneration(
        id=eid,
        timestamp=p.now_ms(),
        payload=p.GenerationPayload(
            seq=0,
            provider="simulated",
            response_model="sim-small",
            input_tokens=tokens,
            output_tokens=tokens,
        ),
    )


async def _ack_of_result(daemon: RawDaemon) -> p.JobAck:
    while True:
        ack = await daemon.next_of(p.JobAck, timeout=scaled(10))
        if ack.payload.of == "job:result":
            return ack  # type: ignore[no-any-return]


async def test_invalid_result_ends_the_attempt_failed(db_url: str) -> None:
    """An oversized job:result from the daemon holding the execution: answered invalid_frame
    naming the frame, then the attempt is recorded failed (invalid_result, not retried), the
    job decided, the lease and slot freed, usage the sum of its recorded calls; a later valid
    result for it is a duplicate that counts nothing."""
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=1)
        await daemon.connect()
        job_id = await _submit(service, max_attempts=3)
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        await daemon.accept(offer)
        await daemon.send(_call(offer.id, 10))
        await daemon.send(_oversized_result(offer.id))
        error = await daemon.next_of(p.Error, timeout=scaled(10))
        assert (error.payload.code, error.payload.of) == ("invalid_frame", "job:result")
        assert error.id == offer.id and error.payload.path == "$.payload.errorMessage"
        ack = await _ack_of_result(daemon)  # the orchestrator's own result for the attempt
        assert ack.id == offer.id
        [execution] = await fetch(
            db_url,
            "SELECT status, error_class, error, lease_expires_at, input_tokens, output_tokens"
            " FROM executions WHERE id = $1",
            offer.id,
        )
        assert (execution["status"], execution["error_class"]) == ("failed", "invalid_result")
        assert "errorMessage" in execution["error"] and execution["lease_expires_at"] is None
        assert (execution["input_tokens"], execution["output_tokens"]) == (10, 10)
        [job] = await fetch(
            db_url, "SELECT status, attempts, input_tokens FROM jobs WHERE id = $1", job_id
        )
        assert (job["status"], job["attempts"], job["input_tokens"]) == ("failed", 1, 10)

        # A later valid result for the same execution: acknowledged, nothing counted again.
        await daemon.send(
            p.JobResult(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.ResultPayload(success=True, input_tokens=500, output_tokens=500),
            )
        )
        await _ack_of_result(daemon)
        [again] = await fetch(
            db_url, "SELECT status, input_tokens FROM executions WHERE id = $1", offer.id
        )
        assert (again["status"], again["input_tokens"]) == ("failed", 10)

        # The slot is free: the same one-slot daemon is offered the next job.
        await _submit(service)
        second = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        await daemon.accept(second)
        await daemon.finish(second, tokens=3)
        await daemon.close()


async def test_another_daemon_cannot_end_an_execution_it_does_not_hold(db_url: str) -> None:
    """Fencing: an invalid result for an execution held by another daemon is refused and
    answered not_assigned; the attempt stays with its daemon, which then finishes it."""
    async with running_service(db_url) as service:
        holder = RawDaemon(ws_url(service), "holder", capacity=1)
        await holder.connect()
        intruder = RawDaemon(ws_url(service), "intruder", executors=["other"], capacity=1)
        await intruder.connect()
        job_id = await _submit(service)
        offer = await holder.next_of(p.JobOffer, timeout=scaled(10))
        await holder.accept(offer)
        await holder.send(_call(offer.id, 1))
        await holder.next_of(p.JobAck, timeout=scaled(10))  # the call is recorded: running
        await intruder.send(_oversized_result(offer.id))
        first = await intruder.next_of(p.Error, timeout=scaled(10))
        assert first.payload.code == "invalid_frame"
        second = await intruder.next_of(p.Error, timeout=scaled(10))
        assert (second.payload.code, second.payload.of) == ("not_assigned", "job:result")
        [execution] = await fetch(
            db_url, "SELECT status, error_class FROM executions WHERE id = $1", offer.id
        )
        assert (execution["status"], execution["error_class"]) == ("running", None)
        await holder.finish(offer, tokens=4)
        [job] = await fetch(db_url, "SELECT status FROM jobs WHERE id = $1", job_id)
        assert job["status"] == "succeeded"
        await holder.close()
        await intruder.close()


class _RefusingOrchestrator:
    """Speaks just enough tally/1 to run one job on a real tallyd, and refuses its frames
    as invalid the way an orchestrator does (an ``error`` naming the frame)."""

    def __init__(self) -> None:
        self.offer = p.make(
            p.JobOffer,
            p.OfferPayload(job_id=p.new_id(), attempt=1, executor="simulated", spec={"turns": 1}),
        )
        self.results: list[p.JobResult] = []
        self.generations: list[p.JobGeneration] = []
        self.sessions = 0
        self.done = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        register = p.decode_daemon_frame(await ws.recv())
        assert isinstance(register, p.DaemonRegister)
        self.sessions += 1
        await ws.send(
            p.encode(
                p.make(
                    p.DaemonRegistered,
                    p.RegisteredPayload(
                        heartbeat_interval_ms=60_000,
                        offer_timeout_ms=60_000,
                        lease_timeout_ms=60_000,
                    ),
                    register.id,
                )
            ).decode()
        )
        if self.sessions == 1:
            await ws.send(p.encode(self.offer).decode())
        async for data in ws:
            frame = p.decode_daemon_frame(data)
            if isinstance(frame, p.JobGeneration):
                self.generations.append(frame)
                refusal = error_frame(
                    "invalid_frame", "refused", "$.payload", frame.id, "job:generation", 0
                )
                await ws.send(p.encode(refusal).decode())
            elif isinstance(frame, p.JobResult):
                self.results.append(frame)
                if len(self.results) == 1:
                    refusal = error_frame(
                        "invalid_frame",
                        "Expected `str` of length <= 65536",
                        "$.payload.errorMessage",
                        frame.id,
                        "job:result",
                    )
                    await ws.send(p.encode(refusal).decode())
                    continue
                ack = p.make(p.JobAck, p.AckPayload(of="job:result"), frame.id)
                await ws.send(p.encode(ack).decode())
                self.done.set()


async def test_daemon_replaces_a_refused_result_and_drops_a_refused_call(tmp_path: Path) -> None:
    """A real tallyd whose job:result is answered invalid_frame sends a minimal valid result in
    its place (failed, saying why), and a job:generation answered invalid_frame leaves its
    outbox: after a reconnect nothing refused is sent again."""
    fake = _RefusingOrchestrator()
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        daemon = start_daemon(f"ws://127.0.0.1:{port}", tmp_path / "d", "--executor", "simulated")
        try:
            await asyncio.wait_for(fake.done.wait(), scaled(30))
            first, replacement = fake.results
            assert first.payload.success is True
            r = replacement.payload
            assert replacement.id == fake.offer.id and r.success is False
            assert r.stop_reason == "error" and r.error_class == "permanent"
            assert "refused this attempt's job:result" in str(r.error_message)
            assert "$.payload.errorMessage" in str(r.error_message)
            assert len(fake.generations) == 1
            # Reconnect: the outbox holds nothing (the call refused, the replacement acked).
            for ws in list(server.connections):
                await ws.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + scaled(15)
            while fake.sessions < 2 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert fake.sessions == 2
            await asyncio.sleep(0.5)
            assert len(fake.generations) == 1 and len(fake.results) == 2
        finally:
            with contextlib.suppress(Exception):
                await stop_daemon_async(daemon)


async def test_retry_after_is_honoured_up_to_the_shared_bound(db_url: str) -> None:
    """A retryable failure asking 500 s is re-queued 500 s out (the daemon's and the
    orchestrator's one bound, MAX_RETRY_AFTER_MS = 10 min; it used to be cut to 5 min), and
    one asking an hour is re-queued 10 minutes out."""
    from shared.limits import MAX_RETRY_AFTER_MS

    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d1", capacity=2)
        await daemon.connect()
        waits = {}
        for asked in (500_000.0, 3_600_000.0):
            job_id = await _submit(service, max_attempts=2)
            offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
            await daemon.accept(offer)
            await daemon.send(
                p.JobResult(
                    id=offer.id,
                    timestamp=p.now_ms(),
                    payload=p.ResultPayload(
                        success=False,
                        stop_reason="error",
                        error_class="retryable",
                        retry_after_ms=asked,
                    ),
                )
            )
            await _ack_of_result(daemon)
            [job] = await fetch(
                db_url,
                "SELECT status, extract(epoch FROM available_at - now()) AS wait"
                " FROM jobs WHERE id = $1",
                job_id,
            )
            assert job["status"] == "queued"
            waits[asked] = float(job["wait"])
        await daemon.close()
    assert 480 < waits[500_000.0] <= 500
    assert MAX_RETRY_AFTER_MS / 1000 - 20 < waits[3_600_000.0] <= MAX_RETRY_AFTER_MS / 1000


# --- review of issue 25, findings 12-14: what the daemon settles on an error -------------------


class _ScriptedOrchestrator:
    """Runs one simulated job on a real tallyd over several sessions; the test says what each
    session answers (``refuse``) and records every job frame per session."""

    def __init__(self, spec: dict[str, Any], refuse: Any) -> None:
        self.offer = p.make(
            p.JobOffer,
            p.OfferPayload(job_id=p.new_id(), attempt=1, executor="simulated", spec=spec),
        )
        self.refuse = refuse  # (orchestrator, session, frame, ws) -> awaitable
        self.sessions = 0
        self.frames: list[tuple[int, Any]] = []
        self.changed = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        register = p.decode_daemon_frame(await ws.recv())
        assert isinstance(register, p.DaemonRegister)
        self.sessions += 1
        session = self.sessions
        registered = p.RegisteredPayload(
            heartbeat_interval_ms=60_000, offer_timeout_ms=60_000, lease_timeout_ms=60_000
        )
        await ws.send(p.encode(p.make(p.DaemonRegistered, registered, register.id)).decode())
        if session == 1:
            await ws.send(p.encode(self.offer).decode())
        async for data in ws:
            frame = p.decode_daemon_frame(data)
            if isinstance(frame, p.JobGeneration | p.JobTool | p.JobResult):
                self.frames.append((session, frame))
                await self.refuse(self, session, frame, ws)
                self.changed.set()

    def of(self, session: int, cls: type) -> list[Any]:
        """The frames of one type a session received."""
        return [f for s, f in self.frames if s == session and isinstance(f, cls)]

    async def wait(self, predicate: Any, timeout: float) -> None:
        """Wait until the predicate holds (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - loop.time()))
            if loop.time() > deadline:
                raise AssertionError("the daemon did not send what was expected in time")


async def _reconnect(server: Any, fake: _ScriptedOrchestrator, sessions: int) -> None:
    for ws in list(server.connections):
        await ws.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(15)
    while fake.sessions < sessions and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert fake.sessions == sessions


async def _send(ws: ServerConnection, frame: Any) -> None:
    await ws.send(p.encode(frame).decode())


async def test_a_refusal_without_seq_settles_no_call(tmp_path: Path) -> None:
    """An invalid_frame naming a job:generation whose seq could not be read deletes nothing
    by guess: after a reconnect every unacknowledged call (seq 0 included) is resent."""

    async def refuse(fake: Any, session: int, frame: Any, ws: ServerConnection) -> None:
        if session == 1 and isinstance(frame, p.JobGeneration) and frame.payload.seq == 1:
            await _send(
                ws,
                error_frame("invalid_frame", "refused", "$.payload", frame.id, of="job:generation"),
            )

    fake = _ScriptedOrchestrator({"turns": 2}, refuse)
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        daemon = start_daemon(f"ws://127.0.0.1:{port}", tmp_path / "d", "--executor", "simulated")
        try:
            await fake.wait(lambda: fake.of(1, p.JobResult), scaled(30))
            await asyncio.sleep(0.3)  # the refusal is handled before the link goes
            await _reconnect(server, fake, 2)
            await fake.wait(lambda: fake.of(2, p.JobResult), scaled(15))
        finally:
            with contextlib.suppress(Exception):
                await stop_daemon_async(daemon)
    assert sorted(g.payload.seq for g in fake.of(2, p.JobGeneration)) == [0, 1]


async def test_a_result_refused_twice_keeps_its_replacement(tmp_path: Path) -> None:
    """A job:result answered invalid_frame twice in one session (two copies of it were sent):
    the daemon replaces it once, and the second refusal does not delete the replacement,
    which is resent after a reconnect and then acknowledged."""

    async def refuse(fake: Any, session: int, frame: Any, ws: ServerConnection) -> None:
        if isinstance(frame, p.JobGeneration):
            await _send(
                ws,
                p.make(
                    p.JobAck, p.AckPayload(of="job:generation", seq=frame.payload.seq), frame.id
                ),
            )
        elif isinstance(frame, p.JobResult) and frame.payload.success:
            for _ in range(2):
                await _send(
                    ws,
                    error_frame(
                        "invalid_frame", "too long", "$.payload.output", frame.id, "job:result"
                    ),
                )
        elif isinstance(frame, p.JobResult) and session > 1:
            await _send(ws, p.make(p.JobAck, p.AckPayload(of="job:result"), frame.id))

    fake = _ScriptedOrchestrator({"turns": 1}, refuse)
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        daemon = start_daemon(f"ws://127.0.0.1:{port}", tmp_path / "d", "--executor", "simulated")
        try:
            await fake.wait(lambda: len(fake.of(1, p.JobResult)) >= 2, scaled(30))
            await asyncio.sleep(0.3)  # the second refusal is handled before the link goes
            await _reconnect(server, fake, 2)
            await fake.wait(lambda: fake.of(2, p.JobResult), scaled(15))
            await asyncio.sleep(0.3)
        finally:
            with contextlib.suppress(Exception):
                await stop_daemon_async(daemon)
    original, replacement = fake.of(1, p.JobResult)
    assert original.payload.success and not replacement.payload.success
    assert "refused this attempt's job:result" in str(replacement.payload.error_message)
    [resent] = fake.of(2, p.JobResult)
    assert resent.payload == replacement.payload and resent.id == fake.offer.id


class _Strict:
    """An executor whose spec check explains itself at length (a plugin-style executor)."""

    name = "strict"
    models: ClassVar[list[str]] = []

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Refuse every spec with a 100 KB reason, lone surrogates and NUL included."""
        raise SpecError("no: " + "\ud800\x00why" * 20_000)

    async def run(self, ctx: Any) -> Any:
        """Never reached."""
        raise AssertionError("refused specs do not run")


async def test_a_reject_message_is_fitted_to_the_wire(tmp_path: Path) -> None:
    """A job:reject whose reason is 100 KB of text (NUL and lone surrogates in it) is sent
    fitted to the wire's 64 KiB and marked cut, so the orchestrator decodes it."""
    from daemon.config import DaemonSettings
    from daemon.worker import Worker

    rejects: list[Any] = []
    got = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        register = p.decode_daemon_frame(await ws.recv())
        registered = p.RegisteredPayload(
            heartbeat_interval_ms=60_000, offer_timeout_ms=60_000, lease_timeout_ms=60_000
        )
        await _send(ws, p.make(p.DaemonRegistered, registered, register.id))
        offer = p.make(p.JobOffer, p.OfferPayload(job_id=p.new_id(), attempt=1, executor="strict"))
        await _send(ws, offer)
        rejects.append(await ws.recv())
        got.set()
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        worker = Worker(DaemonSettings(f"ws://127.0.0.1:{port}", None, tmp_path / "d"))
        worker.executors["strict"] = _Strict()  # type: ignore[assignment]
        task = asyncio.create_task(worker._connection_loop())
        try:
            await asyncio.wait_for(got.wait(), scaled(15))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            worker.outbox.close()
    reject = p.decode_daemon_frame(rejects[0])
    assert isinstance(reject, p.JobReject) and reject.payload.reason == "unsupported"
    message = str(reject.payload.message)
    assert len(message) <= MAX_TEXT and message.startswith("no: ") and "… [cut: " in message

"""Per-connection frame handling for daemons and clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from orchestrator.hub import ClientSession, DaemonSession, Hub, Window, send
from orchestrator.metrics import Metrics
from orchestrator.store import JobStore
from orchestrator.store.ledger import Incoming
from orchestrator.writer import TRANSIENT, Pending, Writer
from shared import protocol as p

log = logging.getLogger("tally.connections")

CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
CLOSE_HEARTBEAT = 4001
CLOSE_SUPERSEDED = 4002
CLOSE_PROTOCOL = 4003


def error_frame(
    code: str, message: str, path: str | None = None, ref: str | None = None
) -> p.Error:
    """An ``error`` frame reusing the id of the frame that caused it."""
    return p.Error(
        id=ref or p.new_id(),
        timestamp=p.now_ms(),
        payload=p.ErrorPayload(code=code, message=message, path=path or msgspec.UNSET),
    )


async def retry_until_done(action: Callable[[], Awaitable[object]], limit: float = 600) -> None:
    """Retry a database action through an outage (bounded), backing off to 5 s."""
    loop = asyncio.get_running_loop()
    deadline, backoff = loop.time() + limit, 0.2
    while True:
        try:
            await action()
            return
        except TRANSIENT as exc:
            if loop.time() > deadline:
                log.error("gave up on a database action after %.0fs: %s", limit, exc)
                return
            await asyncio.sleep(backoff)
            backoff = min(5.0, backoff * 2)


class Context:
    """What every connection handler needs from the service."""

    def __init__(
        self,
        hub: Hub,
        jobs: JobStore,
        writer: Writer,
        metrics: Metrics,
        is_ready: Callable[[], bool],
    ) -> None:
        self.hub = hub
        self.jobs = jobs
        self.writer = writer
        self.metrics = metrics
        self.is_ready = is_ready
        self.settings = hub.settings


async def reject_frame(ctx: Context, ws: ServerConnection, exc: p.ProtocolError) -> None:
    """Answer an invalid frame: error frame; invalid JSON also closes with 1008."""
    ctx.metrics.frames_rejected.labels(exc.code).inc()
    await send(ws, error_frame(exc.code, exc.message, exc.path, exc.frame_id))
    if exc.code == "invalid_json":
        await ws.close(CLOSE_POLICY, "invalid JSON")


class DaemonHandler:
    """One daemon connection: register, heartbeats, offers' answers and job frames."""

    def __init__(self, ctx: Context, ws: ServerConnection) -> None:
        self.ctx = ctx
        self.ws = ws
        self.session: DaemonSession | None = None

    async def run(self, first: str | bytes) -> None:
        """Handle the connection until it closes."""
        ctx = self.ctx
        try:
            frame = p.decode_daemon_frame(first)
        except p.ProtocolError as exc:
            await reject_frame(ctx, self.ws, exc)
            await self.ws.close(CLOSE_POLICY, "expected daemon:register")
            return
        ctx.metrics.count_received(p.frame_type(frame))
        if not isinstance(frame, p.DaemonRegister):
            ctx.metrics.frames_rejected.labels("not_registered").inc()
            await send(
                self.ws,
                error_frame("not_registered", "send daemon:register first", "$.type", frame.id),
            )
            await self.ws.close(CLOSE_POLICY, "expected daemon:register")
            return
        if not await self._register(frame):
            return
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            async for data in self.ws:
                await self._handle(data)
        except ConnectionClosed:
            pass
        finally:
            heartbeat.cancel()
            await self._disconnected()

    async def _register(self, frame: p.DaemonRegister) -> bool:
        ctx, reg = self.ctx, frame.payload
        if p.protocol_major(reg.protocol_version) != p.PROTOCOL_MAJOR:
            ctx.metrics.frames_rejected.labels("incompatible_protocol").inc()
            await send(
                self.ws,
                error_frame(
                    "incompatible_protocol",
                    f"protocol {reg.protocol_version} is not supported; this orchestrator speaks "
                    f"{p.PROTOCOL_VERSION}",
                    "$.payload.protocolVersion",
                    frame.id,
                ),
            )
            await self.ws.close(CLOSE_PROTOCOL, "incompatible protocol")
            return False
        if not ctx.hub.accepting:
            await self.ws.close(CLOSE_GOING_AWAY, "orchestrator shutting down")
            return False
        session = DaemonSession(
            daemon_id=reg.daemon_id,
            ws=self.ws,
            executors={e.name: frozenset(e.models) for e in reg.executors},
            capacity=reg.max_concurrent_jobs,
            unacked=Window(ctx.settings.max_unacked_per_daemon),
        )
        inflight = [i.execution_id.lower() for i in reg.inflight]
        try:
            await ctx.jobs.upsert_daemon(reg, ctx.settings.orchestrator_id)
            resumed = await ctx.jobs.reattach(reg.daemon_id, inflight, ctx.settings.lease_timeout)
        except TRANSIENT as exc:
            # The database is down: serve the daemon anyway (its frames wait, unacknowledged,
            # in its outbox) and record the registration once the database is back.
            log.warning("registering %s without the database (%s)", reg.daemon_id, exc)
            resumed = [(i.execution_id.lower(), i.job_id.lower()) for i in reg.inflight]
            asyncio.get_running_loop().create_task(
                retry_until_done(lambda: self._register_late(reg, inflight))
            )
        for eid, jid in resumed:
            ctx.hub.attach(session, eid, jid)
            session.running.add(eid)
        old = ctx.hub.add_daemon(session)
        self.session = session
        if old is not None:
            with contextlib.suppress(Exception):
                await old.ws.close(CLOSE_SUPERSEDED, "superseded by a newer connection")
        s = ctx.settings
        await send(
            self.ws,
            p.DaemonRegistered(
                id=frame.id,
                timestamp=p.now_ms(),
                payload=p.RegisteredPayload(
                    heartbeat_interval_ms=int(s.heartbeat_interval * 1000),
                    offer_timeout_ms=int(s.offer_timeout * 1000),
                    lease_timeout_ms=int(s.lease_timeout * 1000),
                    resumed=[eid for eid, _ in resumed],
                ),
            ),
        )
        log.info(
            "daemon %s registered (%d slots, %d resumed)",
            reg.daemon_id,
            reg.max_concurrent_jobs,
            len(resumed),
        )
        return True

    async def _register_late(self, reg: p.RegisterPayload, inflight: list[str]) -> None:
        ctx = self.ctx
        await ctx.jobs.upsert_daemon(reg, ctx.settings.orchestrator_id)
        reattached = await ctx.jobs.reattach(reg.daemon_id, inflight, ctx.settings.lease_timeout)
        kept = {eid for eid, _ in reattached}
        if self.session is not None:
            for eid in [e for e in self.session.executions if e in inflight and e not in kept]:
                ctx.hub.release(eid)

    async def _heartbeat(self) -> None:
        s, session = self.ctx.settings, self.session
        assert session is not None
        while True:
            await asyncio.sleep(s.heartbeat_interval)
            if time.monotonic() - session.last_pong > s.heartbeat_timeout:
                log.warning("daemon %s missed its heartbeat deadline", session.daemon_id)
                await self.ws.close(CLOSE_HEARTBEAT, "heartbeat timeout")
                return
            await send(
                self.ws,
                p.HeartbeatPing(id=p.new_id(), timestamp=p.now_ms(), payload=p.EmptyPayload()),
            )

    async def _disconnected(self) -> None:
        session = self.session
        if session is None:
            return
        if self.ctx.hub.remove_daemon(session):
            with contextlib.suppress(Exception):
                await self.ctx.jobs.set_daemon_status(
                    session.daemon_id, "disconnected", self.ctx.settings.orchestrator_id
                )

    async def _handle(self, data: str | bytes) -> None:
        ctx, session = self.ctx, self.session
        assert session is not None
        try:
            frame = p.decode_daemon_frame(data)
        except p.ProtocolError as exc:
            await reject_frame(ctx, self.ws, exc)
            return
        ctx.metrics.count_received(p.frame_type(frame))
        session.last_pong = time.monotonic()
        if isinstance(frame, p.JobGeneration | p.JobResult):
            await self._enqueue(frame)
        elif isinstance(frame, p.HeartbeatPong):
            session.active_jobs_reported = frame.payload.active_jobs
        elif isinstance(frame, p.JobAccept):
            eid = frame.id.lower()
            lease = ctx.settings.lease_timeout
            try:
                accepted = await ctx.jobs.accept(eid, session.daemon_id, lease)
            except TRANSIENT:
                session.running.add(eid)
                asyncio.get_running_loop().create_task(
                    retry_until_done(lambda: ctx.jobs.accept(eid, session.daemon_id, lease))
                )
                return
            if accepted:
                session.running.add(eid)
            else:
                await self._not_assigned(frame.id, "job:accept")
        elif isinstance(frame, p.JobReject):
            ctx.hub.release(frame.id.lower())
            try:
                requeued = await ctx.jobs.reject(
                    frame.id,
                    session.daemon_id,
                    frame.payload.reason,
                    frame.payload.message if isinstance(frame.payload.message, str) else None,
                )
            except TRANSIENT:
                return  # the offer times out and the reaper re-queues the job
            if requeued is None:
                await self._not_assigned(frame.id, "job:reject")
            elif requeued.job_status == "failed":
                ctx.metrics.jobs.labels(requeued.executor, "failed").inc()
        elif isinstance(frame, p.DaemonDraining):
            log.info("daemon %s draining", session.daemon_id)
            session.draining = True
            with contextlib.suppress(*TRANSIENT):
                await ctx.jobs.set_daemon_status(
                    session.daemon_id, "draining", ctx.settings.orchestrator_id
                )
            log.info("daemon %s draining recorded", session.daemon_id)
        elif isinstance(frame, p.DaemonRegister):
            ctx.metrics.frames_rejected.labels("already_registered").inc()
            await send(
                self.ws,
                error_frame(
                    "already_registered", "daemon:register may be sent once", "$.type", frame.id
                ),
            )

    async def _not_assigned(self, execution_id: str, what: str) -> None:
        await send(self.ws, self._not_assigned_frame(execution_id, what))

    def _not_assigned_frame(self, execution_id: str, what: str) -> p.Error:
        self.ctx.metrics.frames_rejected.labels("not_assigned").inc()
        return error_frame(
            "not_assigned",
            f"{what}: execution {execution_id} is not assigned to this daemon or no longer open",
            "$.id",
            execution_id,
        )

    async def _enqueue(self, frame: p.JobGeneration | p.JobResult) -> None:
        session = self.session
        assert session is not None
        # Backpressure: at most N frames per daemon wait for durability; beyond that we stop
        # reading from this socket until acks free room.
        await session.unacked.acquire()
        ctx, ws = self.ctx, self.ws
        is_result = isinstance(frame, p.JobResult)
        seq = None if is_result else frame.payload.seq  # type: ignore[union-attr]

        def reply(verdict: str) -> p.AnyFrame:
            session.unacked.release()
            if verdict == "refused":
                ctx.metrics.frames_rejected.labels("refused_by_database").inc()
                return error_frame(
                    "refused_by_database", "the ledger refused this frame", "$", frame.id
                )
            if verdict == "not_assigned":
                return self._not_assigned_frame(frame.id, p.frame_type(frame))
            if verdict == "duplicate":
                ctx.metrics.results_duplicate.inc()
            return p.JobAck(
                id=frame.id,
                timestamp=p.now_ms(),
                payload=p.AckPayload(of="job:result", seq=msgspec.UNSET)
                if is_result
                else p.AckPayload(of="job:generation", seq=seq if seq is not None else 0),
            )

        ctx.writer.submit(Pending(Incoming(session.daemon_id, frame), ws, reply, time.monotonic()))


class ClientHandler:
    """One client connection: submit, watch, cancel."""

    def __init__(self, ctx: Context, ws: ServerConnection) -> None:
        self.ctx = ctx
        self.ws = ws
        self.session = ClientSession(ws)

    async def run(self, first: str | bytes) -> None:
        """Handle the connection until it closes."""
        try:
            await self._handle(first)
            async for data in self.ws:
                await self._handle(data)
        except ConnectionClosed:
            pass
        finally:
            self.ctx.hub.unwatch_all(self.session)

    async def _handle(self, data: str | bytes) -> None:
        ctx = self.ctx
        try:
            frame = p.decode_client_frame(data)
        except p.ProtocolError as exc:
            await reject_frame(ctx, self.ws, exc)
            return
        ctx.metrics.count_received(p.frame_type(frame))
        handler: Callable[[], Awaitable[None]]
        if isinstance(frame, p.JobSubmit):
            handler = lambda: self._submit(frame)  # noqa: E731
        elif isinstance(frame, p.JobWatch):
            handler = lambda: self._watch(frame)  # noqa: E731
        else:
            handler = lambda: self._cancel(frame)  # noqa: E731
        try:
            await handler()
        except ConnectionClosed:
            raise
        except Exception as exc:
            log.exception("client frame %s failed", p.frame_type(frame))
            await send(
                self.ws, error_frame("unavailable", f"could not process: {exc}", None, frame.id)
            )

    async def _submit(self, frame: p.JobSubmit) -> None:
        if not self.ctx.hub.accepting:
            await send(
                self.ws, error_frame("shutting_down", "orchestrator is draining", None, frame.id)
            )
            return
        ids = await self.ctx.jobs.submit(frame.payload.jobs)
        await send(
            self.ws,
            p.JobSubmitted(
                id=frame.id, timestamp=p.now_ms(), payload=p.SubmittedPayload(job_ids=ids)
            ),
        )

    async def _watch(self, frame: p.JobWatch) -> None:
        ids = [j.lower() for j in frame.payload.job_ids]
        self.ctx.hub.watch(self.session, ids)
        await self.ctx.hub.publish(ids)

    async def _cancel(self, frame: p.ClientCancel) -> None:
        job_id = frame.payload.job_id.lower()
        status = await self.ctx.jobs.request_cancel(job_id)
        if status is None:
            await send(
                self.ws,
                error_frame(
                    "not_cancellable",
                    f"job {job_id} is unknown or already finished",
                    "$.payload.jobId",
                    frame.id,
                ),
            )
        # A running job's daemon hears about it through the jobs notification, wherever it is.

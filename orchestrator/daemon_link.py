"""A daemon's connection: registration, heartbeats, answers to offers; job frames go to ingest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from orchestrator.dispatch import Dispatcher
from orchestrator.ingest import Pending, Writer, refused_result
from orchestrator.metrics import Metrics
from orchestrator.sessions import DaemonSession, Window
from orchestrator.store import JobStore, cancels
from orchestrator.store.db import TRANSIENT, classify, retry_until_done
from orchestrator.store.ledger import Incoming
from orchestrator.wire import send
from shared import protocol as p
from shared import replies
from shared.protocol import CloseCode
from shared.replies import error_frame, not_assigned

log = logging.getLogger(__name__)


def token_fingerprint(token: str | None) -> str | None:
    """What the database keeps of a daemon's token: a SHA-256 prefix, never the token."""
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()[:32]


class Context:
    """What every connection handler needs from the service."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        jobs: JobStore,
        writer: Writer,
        metrics: Metrics,
    ) -> None:
        self.dispatcher = dispatcher
        self.jobs = jobs
        self.writer = writer
        self.metrics = metrics
        self.settings = dispatcher.settings


async def reject_frame(
    ctx: Context, ws: ServerConnection, exc: p.ProtocolError, data: bytes | str | None = None
) -> None:
    """Answer an invalid frame: error frame naming the job frame it refuses (``of``, ``seq``);
    invalid JSON also closes with 1008."""
    ctx.metrics.frames_rejected.labels(exc.code).inc()
    await send(ws, replies.invalid(exc, data))
    if exc.code == "invalid_json":
        await ws.close(CloseCode.POLICY, "invalid JSON")


class DaemonHandler:
    """One daemon connection: register, heartbeats, offers' answers and job frames."""

    def __init__(self, ctx: Context, ws: ServerConnection, token: str | None = None) -> None:
        self.ctx = ctx
        self.ws = ws
        self.token = token
        self.session: DaemonSession | None = None
        self._accepts: set[asyncio.Task[None]] = set()

    async def run(self, first: str | bytes) -> None:
        """Handle the connection until it closes."""
        ctx = self.ctx
        try:
            frame = p.decode_daemon_frame(first)
        except p.ProtocolError as exc:
            await reject_frame(ctx, self.ws, exc)
            await self.ws.close(CloseCode.POLICY, "expected daemon:register")
            return
        ctx.metrics.count_received(p.frame_type(frame))
        if not isinstance(frame, p.DaemonRegister):
            ctx.metrics.frames_rejected.labels("not_registered").inc()
            await send(
                self.ws,
                error_frame("not_registered", "send daemon:register first", "$.type", frame.id),
            )
            await self.ws.close(CloseCode.POLICY, "expected daemon:register")
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
            for task in self._accepts:
                task.cancel()
            await self._disconnected()

    def _binding_refusal(self, daemon_id: str) -> str | None:
        """Why this connection's token may not register as ``daemon_id``, or None."""
        bindings = self.ctx.settings.daemon_token_bindings
        ids_of_token = {i for i, t in bindings if t == self.token}
        tokens_of_id = {t for i, t in bindings if i == daemon_id}
        if tokens_of_id and self.token not in tokens_of_id:
            return f"daemon id {daemon_id!r} is bound to another token"
        if ids_of_token and daemon_id not in ids_of_token:
            return f"this token is bound to daemon ids {sorted(ids_of_token)}, not {daemon_id!r}"
        held = self.ctx.dispatcher.daemons.get(daemon_id)
        if held is not None and held.token != self.token:
            return f"daemon id {daemon_id!r} is held by a connected daemon of another token"
        return None

    async def _refuse_registration(self, frame: p.DaemonRegister, why: str) -> None:
        self.ctx.metrics.frames_rejected.labels("forbidden").inc()
        log.warning("registration as %r refused: %s", frame.payload.daemon_id, why)
        await send(self.ws, error_frame("forbidden", why, "$.payload.daemonId", frame.id))
        await self.ws.close(CloseCode.POLICY, "daemon id not allowed for this token")

    async def _register(self, frame: p.DaemonRegister) -> bool:
        ctx = self.ctx
        # PostgreSQL text and jsonb cannot hold U+0000: stored as U+FFFD instead.
        reg = p.without_nul(frame.payload)
        why = self._binding_refusal(reg.daemon_id)
        if why is not None:
            await self._refuse_registration(frame, why)
            return False
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
            await self.ws.close(CloseCode.PROTOCOL, "incompatible protocol")
            return False
        if not ctx.dispatcher.accepting:
            await self.ws.close(CloseCode.GOING_AWAY, "orchestrator shutting down")
            return False
        session = DaemonSession(
            daemon_id=reg.daemon_id,
            ws=self.ws,
            executors={e.name: frozenset(e.models) for e in reg.executors},
            capacity=reg.max_concurrent_jobs,
            unacked=Window(ctx.settings.max_unacked_per_daemon),
            token=self.token,
        )
        inflight = [i.execution_id.lower() for i in reg.inflight]
        try:
            if not await ctx.jobs.upsert_daemon(
                reg,
                ctx.settings.orchestrator_id,
                token_fingerprint(self.token),
                ctx.settings.heartbeat_timeout,
            ):
                await self._refuse_registration(
                    frame,
                    f"daemon id {reg.daemon_id!r} is held by a connected daemon of another token",
                )
                return False
            resumed = await ctx.jobs.reattach(reg.daemon_id, inflight, ctx.settings.lease_timeout)
            # Cancels requested while the link was down: the notification reached no one.
            to_cancel = await cancels.pending(ctx.jobs.pool, [eid for eid, _ in resumed])
        except TRANSIENT as exc:
            # The database is down: serve the daemon anyway (its frames wait, unacknowledged,
            # in its outbox) and record the registration once the database is back.
            log.warning("registering %s without the database (%s)", reg.daemon_id, exc)
            resumed = [(i.execution_id.lower(), i.job_id.lower()) for i in reg.inflight]
            to_cancel = []  # read by _register_late, then by the reaper's sweep
            asyncio.get_running_loop().create_task(
                retry_until_done(lambda: self._register_late(reg, inflight))
            )
        for eid, jid in resumed:
            ctx.dispatcher.attach(session, eid, jid)
            session.running.add(eid)
        old = ctx.dispatcher.add_daemon(session)
        self.session = session
        if old is not None:
            with contextlib.suppress(Exception):
                await old.ws.close(CloseCode.SUPERSEDED, "superseded by a newer connection")
        s = ctx.settings
        await send(
            self.ws,
            p.make(
                p.DaemonRegistered,
                p.RegisteredPayload(
                    heartbeat_interval_ms=int(s.heartbeat_interval * 1000),
                    offer_timeout_ms=int(s.offer_timeout * 1000),
                    lease_timeout_ms=int(s.lease_timeout * 1000),
                    resumed=[eid for eid, _ in resumed],
                    max_frame_bytes=min(s.max_frame_bytes, 2**31 - 1),
                ),
                frame.id,
            ),
        )
        log.info(
            "daemon %s registered (%d slots, %d resumed)",
            reg.daemon_id,
            reg.max_concurrent_jobs,
            len(resumed),
        )
        for eid, _ in to_cancel:
            await ctx.dispatcher.cancel(eid)
        return True

    async def _register_late(self, reg: p.RegisterPayload, inflight: list[str]) -> None:
        ctx = self.ctx
        if not await ctx.jobs.upsert_daemon(
            reg,
            ctx.settings.orchestrator_id,
            token_fingerprint(self.token),
            ctx.settings.heartbeat_timeout,
        ):
            log.warning("daemon id %s is held by another token; closing", reg.daemon_id)
            await self.ws.close(CloseCode.POLICY, "daemon id not allowed for this token")
            return
        reattached = await ctx.jobs.reattach(reg.daemon_id, inflight, ctx.settings.lease_timeout)
        kept = {eid for eid, _ in reattached}
        if self.session is not None:
            for eid in [e for e in self.session.executions if e in inflight and e not in kept]:
                ctx.dispatcher.release(eid)
        for eid, _ in await cancels.pending(ctx.jobs.pool, list(kept)):
            await ctx.dispatcher.cancel(eid)

    async def _heartbeat(self) -> None:
        s, session = self.ctx.settings, self.session
        assert session is not None
        while True:
            await asyncio.sleep(s.heartbeat_interval)
            if time.monotonic() - session.last_pong > s.heartbeat_timeout:
                log.warning("daemon %s missed its heartbeat deadline", session.daemon_id)
                await self.ws.close(CloseCode.HEARTBEAT, "heartbeat timeout")
                return
            await send(
                self.ws,
                p.make(p.HeartbeatPing, p.EmptyPayload()),
            )

    async def _disconnected(self) -> None:
        session = self.session
        if session is None:
            return
        if self.ctx.dispatcher.remove_daemon(session):
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
            await reject_frame(ctx, self.ws, exc, data)
            # A result refused still ends its attempt (failed, invalid_result): recorded
            # through the writer if this daemon holds the execution, nothing left running.
            ended = refused_result(exc)
            if ended is not None:
                await self._enqueue(ended)
            return
        ctx.metrics.count_received(p.frame_type(frame))
        session.last_pong = time.monotonic()
        try:
            await self._dispatch(frame)
        except ConnectionClosed:
            raise
        except Exception as exc:
            # A frame this code could not handle is answered, and the link and every other
            # daemon go on: never a 1011 close for one frame.
            log.exception("daemon %s: %s failed", session.daemon_id, p.frame_type(frame))
            kind = classify(exc)
            ctx.metrics.frames_rejected.labels(f"daemon_{kind}").inc()
            await send(
                self.ws,
                error_frame(
                    "unavailable" if kind == "transient" else "internal_error",
                    f"{p.frame_type(frame)} could not be processed; see the orchestrator's log",
                    None,
                    frame.id,
                ),
            )

    async def _dispatch(self, frame: p.DaemonFrame) -> None:
        ctx, session = self.ctx, self.session
        assert session is not None
        match frame:
            case p.JobGeneration() | p.JobTool() | p.JobResult():
                await self._enqueue(frame)
            case p.HeartbeatPong():
                session.active_jobs_reported = frame.payload.active_jobs
            case p.JobAccept():
                eid = frame.id.lower()
                lease = ctx.settings.lease_timeout
                try:
                    accepted = await ctx.jobs.accept(eid, session.daemon_id, lease)
                except TRANSIENT:
                    # Retried until the database decides it, off the receive loop: the offer's
                    # deadline keeps running meanwhile, so the answer may still be not_assigned.
                    task = asyncio.get_running_loop().create_task(self._accept_later(frame.id))
                    self._accepts.add(task)
                    task.add_done_callback(self._accepts.discard)
                    return
                await self._accepted(frame.id, accepted)
            case p.JobReject():
                ctx.dispatcher.release(frame.id.lower())
                reject = p.without_nul(frame.payload)  # stored in executions.error
                try:
                    requeued = await ctx.jobs.reject(
                        frame.id,
                        session.daemon_id,
                        reject.reason,
                        reject.message if isinstance(reject.message, str) else None,
                    )
                except TRANSIENT:
                    return  # the offer times out and the reaper re-queues the job
                if requeued is None:
                    await self._not_assigned(frame.id, "job:reject")
                elif requeued.job_status == "failed":
                    ctx.metrics.count_job(requeued.executor, "failed")
            case p.DaemonDraining():
                log.info("daemon %s draining", session.daemon_id)
                session.draining = True
                with contextlib.suppress(*TRANSIENT):
                    await ctx.jobs.set_daemon_status(
                        session.daemon_id, "draining", ctx.settings.orchestrator_id
                    )
                log.info("daemon %s draining recorded", session.daemon_id)
            case p.DaemonRegister():
                ctx.metrics.frames_rejected.labels("already_registered").inc()
                await send(
                    self.ws,
                    error_frame(
                        "already_registered", "daemon:register may be sent once", "$.type", frame.id
                    ),
                )

    async def _accept_later(self, frame_id: str) -> None:
        ctx, session = self.ctx, self.session
        assert session is not None
        eid = frame_id.lower()
        accepted = await retry_until_done(
            lambda: ctx.jobs.accept(eid, session.daemon_id, ctx.settings.lease_timeout),
            limit=None,
        )
        await self._accepted(frame_id, accepted if isinstance(accepted, bool) else None)

    async def _accepted(self, frame_id: str, cancel_requested: bool | None) -> None:
        """The database's answer to an accept (None: not ours, else whether the job's cancel
        was requested): running, or not_assigned (the daemon stops)."""
        session = self.session
        assert session is not None
        eid = frame_id.lower()
        if cancel_requested is not None:
            session.running.add(eid)
            # A cancel requested between the claim and the offer's attach found no session to
            # tell: the accept's own statement read the flag; answer the accept with it (else
            # the cancel sweep sends it).
            if cancel_requested:
                await self.ctx.dispatcher.cancel(eid)
            return
        self.ctx.dispatcher.release(eid)
        await self._not_assigned(frame_id, "job:accept")

    async def _not_assigned(self, execution_id: str, what: str) -> None:
        self.ctx.metrics.frames_rejected.labels("not_assigned").inc()
        await send(self.ws, not_assigned(execution_id, what))

    async def _enqueue(self, frame: p.JobGeneration | p.JobTool | p.JobResult) -> None:
        """Hand a job frame to ingest, which persists, counts and answers it."""
        session = self.session
        assert session is not None
        # Backpressure: at most N frames per daemon wait for durability; beyond that we stop
        # reading from this socket until acks free room.
        await session.unacked.acquire()
        self.ctx.writer.submit(
            Pending(Incoming(session.daemon_id, frame), session, time.monotonic())
        )

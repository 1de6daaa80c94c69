"""Per-connection frame handling for daemons and clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from orchestrator.hub import ClientSession, DaemonSession, Hub, Window, send
from orchestrator.ingest import TRANSIENT, Pending, Writer
from orchestrator.metrics import Metrics
from orchestrator.store import JobStore
from orchestrator.store.db import classify
from orchestrator.store.ledger import Incoming
from shared import protocol as p
from shared.aio import within

log = logging.getLogger("tally.connections")

CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
CLOSE_HEARTBEAT = 4001
CLOSE_SUPERSEDED = 4002
CLOSE_PROTOCOL = 4003


def error_frame(
    code: str,
    message: str,
    path: str | None = None,
    ref: str | None = None,
    of: str | None = None,
    seq: int | None = None,
) -> p.Error:
    """An ``error`` frame reusing the id of the frame that caused it.

    ``of`` (and ``seq`` for a call) name the job frame answered, so that a daemon drops a
    frame that will never be accepted from its outbox, as it does on an ack.
    """
    return p.Error(
        id=ref or p.new_id(),
        timestamp=p.now_ms(),
        payload=p.ErrorPayload(
            code=code,
            message=message,
            path=path or msgspec.UNSET,
            of=of if of is not None else msgspec.UNSET,  # type: ignore[arg-type]
            seq=seq if seq is not None else msgspec.UNSET,
        ),
    )


def token_fingerprint(token: str | None) -> str | None:
    """What the database keeps of a daemon's token: a SHA-256 prefix, never the token."""
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()[:32]


async def retry_until_done(
    action: Callable[[], Awaitable[object]], limit: float | None = 600
) -> object:
    """Retry a database action through an outage, backing off to 5 s; return its result.

    With a ``limit`` it gives up (returning None) after that many seconds; without one it
    retries until the action completes or the task is cancelled.
    """
    loop = asyncio.get_running_loop()
    deadline, backoff = (None if limit is None else loop.time() + limit), 0.2
    while True:
        try:
            return await action()
        except TRANSIENT as exc:
            if deadline is not None and loop.time() > deadline:
                log.error("gave up on a database action after %.0fs: %s", limit, exc)
                return None
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
    ) -> None:
        self.hub = hub
        self.jobs = jobs
        self.writer = writer
        self.metrics = metrics
        self.settings = hub.settings


async def reject_frame(ctx: Context, ws: ServerConnection, exc: p.ProtocolError) -> None:
    """Answer an invalid frame: error frame; invalid JSON also closes with 1008."""
    ctx.metrics.frames_rejected.labels(exc.code).inc()
    await send(ws, error_frame(exc.code, exc.message, exc.path, exc.frame_id))
    if exc.code == "invalid_json":
        await ws.close(CLOSE_POLICY, "invalid JSON")


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
        held = self.ctx.hub.daemons.get(daemon_id)
        if held is not None and held.token != self.token:
            return f"daemon id {daemon_id!r} is held by a connected daemon of another token"
        return None

    async def _refuse_registration(self, frame: p.DaemonRegister, why: str) -> None:
        self.ctx.metrics.frames_rejected.labels("forbidden").inc()
        log.warning("registration as %r refused: %s", frame.payload.daemon_id, why)
        await send(self.ws, error_frame("forbidden", why, "$.payload.daemonId", frame.id))
        await self.ws.close(CLOSE_POLICY, "daemon id not allowed for this token")

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
        if not await ctx.jobs.upsert_daemon(
            reg,
            ctx.settings.orchestrator_id,
            token_fingerprint(self.token),
            ctx.settings.heartbeat_timeout,
        ):
            log.warning("daemon id %s is held by another token; closing", reg.daemon_id)
            await self.ws.close(CLOSE_POLICY, "daemon id not allowed for this token")
            return
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
                # Retried until the database decides it, off the receive loop: the offer's
                # deadline keeps running meanwhile, so the answer may still be not_assigned.
                task = asyncio.get_running_loop().create_task(self._accept_later(frame.id))
                self._accepts.add(task)
                task.add_done_callback(self._accepts.discard)
                return
            await self._accepted(frame.id, accepted)
        elif isinstance(frame, p.JobReject):
            ctx.hub.release(frame.id.lower())
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

    async def _accept_later(self, frame_id: str) -> None:
        ctx, session = self.ctx, self.session
        assert session is not None
        eid = frame_id.lower()
        accepted = await retry_until_done(
            lambda: ctx.jobs.accept(eid, session.daemon_id, ctx.settings.lease_timeout),
            limit=None,
        )
        await self._accepted(frame_id, bool(accepted))

    async def _accepted(self, frame_id: str, accepted: bool) -> None:
        """The database's answer to an accept: running, or not_assigned (the daemon stops)."""
        session = self.session
        assert session is not None
        eid = frame_id.lower()
        if accepted:
            session.running.add(eid)
            return
        self.ctx.hub.release(eid)
        await self._not_assigned(frame_id, "job:accept")

    async def _not_assigned(self, execution_id: str, what: str, seq: int | None = None) -> None:
        await send(self.ws, self._not_assigned_frame(execution_id, what, seq))

    def _not_assigned_frame(self, execution_id: str, what: str, seq: int | None = None) -> p.Error:
        self.ctx.metrics.frames_rejected.labels("not_assigned").inc()
        return error_frame(
            "not_assigned",
            f"{what}: execution {execution_id} is not assigned to this daemon or no longer open",
            "$.id",
            execution_id,
            of=what,
            seq=seq,
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
                    "refused_by_database",
                    "the ledger cannot hold this frame's values (see the orchestrator's log); "
                    "it was not recorded and will not be",
                    "$.payload",
                    frame.id,
                    of=p.frame_type(frame),
                    seq=seq,
                )
            if verdict == "not_assigned":
                return self._not_assigned_frame(frame.id, p.frame_type(frame), seq)
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
        self.last_frame = time.monotonic()

    async def run(self, first: str | bytes) -> None:
        """Handle the connection until it closes."""
        idle = asyncio.create_task(self._idle_watch())
        try:
            await self._handle(first)
            async for data in self.ws:
                self.last_frame = time.monotonic()
                await self._handle(data)
        except ConnectionClosed:
            pass
        finally:
            idle.cancel()
            self.ctx.hub.unwatch_all(self.session)

    async def _idle_watch(self) -> None:
        """Close a client that watches nothing and has said nothing for the idle timeout.

        A client watching jobs may stay silent as long as it likes, but it must answer
        WebSocket pings (every client library does) within the heartbeat timeout.
        """
        s = self.ctx.settings
        interval = min(s.client_idle_timeout, s.heartbeat_timeout) / 2
        while True:
            await asyncio.sleep(interval)
            if not self.session.watching:
                if time.monotonic() - self.last_frame > s.client_idle_timeout:
                    await self.ws.close(CLOSE_GOING_AWAY, "idle client")
                    return
                continue
            try:
                pong = await self.ws.ping()
                await within(pong, s.heartbeat_timeout)
            except TimeoutError:
                await self.ws.close(CLOSE_HEARTBEAT, "client did not answer a ping")
                return
            except ConnectionClosed:
                return

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
            await send(self.ws, self._failure(p.frame_type(frame), frame.id, exc))

    def _failure(self, frame_type: str, frame_id: str, exc: Exception) -> p.Error:
        """The answer to a client frame the database could not carry out.

        The database's own text never reaches the client: it may name tables and values.
        """
        kind = classify(exc)
        self.ctx.metrics.frames_rejected.labels(f"client_{kind}").inc()
        if kind == "transient":
            log.warning("client %s: database unavailable: %s", frame_type, exc)
            return error_frame(
                "unavailable", "the database is unavailable; retry later", None, frame_id
            )
        if kind == "data":
            log.warning("client %s refused by the database: %r", frame_type, exc)
            return error_frame(
                "invalid_request",
                f"{frame_type}: the ledger cannot hold a value of this request "
                f"({type(exc).__name__})",
                "$.payload",
                frame_id,
            )
        log.exception("client frame %s failed", frame_type)
        return error_frame(
            "internal_error", f"{frame_type} failed; see the orchestrator's log", None, frame_id
        )

    async def _submit(self, frame: p.JobSubmit) -> None:
        if not self.ctx.hub.accepting:
            await send(
                self.ws, error_frame("shutting_down", "orchestrator is draining", None, frame.id)
            )
            return
        # PostgreSQL text and jsonb cannot hold U+0000: stored as U+FFFD instead.
        payload = p.without_nul(frame.payload)
        ids = await self.ctx.jobs.submit(payload.jobs)
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

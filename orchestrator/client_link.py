"""A client's connection: submit, watch and cancel jobs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from orchestrator.daemon_link import Context, reject_frame
from orchestrator.sessions import ClientSession
from orchestrator.store.db import classify
from orchestrator.wire import send
from shared import protocol as p
from shared import specs
from shared.aio import within
from shared.protocol import CloseCode
from shared.replies import error_frame

log = logging.getLogger(__name__)


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
            self.ctx.dispatcher.unwatch_all(self.session)

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
                    await self.ws.close(CloseCode.GOING_AWAY, "idle client")
                    return
                continue
            try:
                pong = await self.ws.ping()
                await within(pong, s.heartbeat_timeout)
            except TimeoutError:
                await self.ws.close(CloseCode.HEARTBEAT, "client did not answer a ping")
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
        if not self.ctx.dispatcher.accepting:
            await send(
                self.ws, error_frame("shutting_down", "orchestrator is draining", None, frame.id)
            )
            return
        # PostgreSQL text and jsonb cannot hold U+0000: stored as U+FFFD instead.
        payload = p.without_nul(frame.payload)
        refusal = await self._refusal(payload)
        if refusal is not None:
            code, message, path = refusal
            self.ctx.metrics.frames_rejected.labels(code).inc()
            await send(self.ws, error_frame(code, message, path, frame.id))
            return
        ids = await self.ctx.jobs.submit(payload.jobs)
        await send(
            self.ws,
            p.make(p.JobSubmitted, p.SubmittedPayload(job_ids=ids), frame.id),
        )

    async def _refusal(self, payload: p.SubmitPayload) -> tuple[str, str, str] | None:
        """Why a submission is refused as a whole (nothing of it is written), or None.

        A spec its built-in executor cannot run is refused with the path of the bad field; a
        job for an executor that no registered daemon has offered, unless the client allows it.
        """
        bad = specs.first_bad(payload.jobs)
        if bad is not None:
            i, exc = bad
            path = f"$.payload.jobs[{i}]" + exc.path.removeprefix("$")
            executor = payload.jobs[i].executor
            return "invalid_spec", f"jobs[{i}] ({executor}): {exc.message}", path
        if payload.allow_unknown_executor:
            return None
        known = await self.ctx.jobs.known_executors()
        for i, job in enumerate(payload.jobs):
            if job.executor not in known:
                offered = ", ".join(sorted(known)) or "none yet"
                return (
                    "unknown_executor",
                    f"no registered daemon offers executor {job.executor!r} (offered: "
                    f"{offered}); start a daemon with it first, or allow unknown executors "
                    "(tally submit --allow-unknown-executor)",
                    f"$.payload.jobs[{i}].executor",
                )
        return None

    async def _watch(self, frame: p.JobWatch) -> None:
        ids = [j.lower() for j in frame.payload.job_ids]
        self.ctx.dispatcher.watch(self.session, ids)
        await self.ctx.dispatcher.publish(ids)

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
        # A running job's daemon hears about it through the jobs notification, wherever it is;
        # the flag is durable, so a daemon the notification missed is told again at its
        # registration, after its accept, and by the reaper's sweep (orchestrator.upkeep).

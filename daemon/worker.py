"""The daemon's connection loop, offers, acks, resends and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from daemon.config import DaemonSettings
from daemon.executors import Executor, SpecError, load_executor
from daemon.outbox import Outbox, answered_key, frame_key
from daemon.runner import JobFrame, fit_result, frame_limit, minimal_result, run_job
from shared import protocol as p
from shared.aio import within
from shared.errors import AuthError, TallyError
from shared.limits import fit_text

log = logging.getLogger(__name__)


def _version() -> str:
    """The installed distribution's version, reported at registration."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tally-ledger")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


class ProtocolViolation(TallyError):
    """The orchestrator broke the protocol (exit 1: a runtime failure, not configuration)."""


VERSION = _version()


class Worker:
    """One ``tallyd`` process."""

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.executors: dict[str, Executor] = {
            name: load_executor(name, config) for name, config in settings.executors.items()
        }
        self.outbox = Outbox(settings.state_dir, settings.max_outbox_frames)
        self.daemon_id = self.outbox.daemon_id(settings.daemon_id)
        self.ws: ClientConnection | None = None
        self.jobs: dict[str, tuple[str, asyncio.Task[Any]]] = {}
        # Cancels that named an execution not (yet) known here, newest last, bounded: an offer
        # for one of them is refused instead of run.
        self.cancelled_unknown: dict[str, None] = {}
        # Executions whose job:result the orchestrator refused and this process replaced, and
        # the session (numbered from 1 by registration) the replacement was first sent in.
        self.refused_results: dict[str, int] = {}
        self.sessions = 0
        # The size every job frame is fitted to: under the limit the orchestrator advertised.
        self.frame_limit = frame_limit(None)
        self.draining = False
        self.stop_now = asyncio.Event()
        self.drained = asyncio.Event()
        self.acked = asyncio.Event()
        self._signals = 0

    # --- sending ---------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        ws = self.ws
        if ws is None:
            return
        with contextlib.suppress(ConnectionClosed, RuntimeError):
            await ws.send(data.decode())

    async def _emit(self, frame: JobFrame) -> None:
        if isinstance(frame, p.JobResult):
            frame = fit_result(frame, self.frame_limit)
        data = p.encode(frame)
        log.debug("emit %s %s", p.frame_type(frame), frame.id)
        key = frame_key(frame)
        # Durable first, then sent: a crash between the two only delays the frame.
        self.outbox.put(key, frame.id.lower(), data)
        # Shielded: a cancel arriving while the job reports its result must not cut the send
        # (the frame would wait in the outbox until the next reconnect).
        await asyncio.shield(self._send(data))

    def _fitted(self, key: str, data: bytes) -> bytes:
        """A stored frame as the orchestrator of this session accepts it: a result larger than
        its frame limit (stored under a larger one, or before a restart) is fitted again
        (:func:`fit_result`) and stored so; calls and tool calls are small by construction."""
        if len(data) <= self.frame_limit or not key.endswith(":result"):
            return data
        try:
            frame = p.decode_daemon_frame(data)
        except p.ProtocolError:
            frame = None
        if isinstance(frame, p.JobResult):
            fitted = fit_result(frame, self.frame_limit)
        else:
            fitted = minimal_result(
                key.removesuffix(":result"),
                "this attempt's stored job:result could not be read to fit the orchestrator's "
                "frame limit; the attempt's usage is the sum of its recorded calls",
            )
        data = p.encode(fitted)
        self.outbox.replace(key, data)
        log.info("refitted %s to %d bytes (frame limit %d)", key, len(data), self.frame_limit)
        return data

    # --- session ---------------------------------------------------------------------------

    def _register_frame(self) -> p.DaemonRegister:
        return p.make(
            p.DaemonRegister,
            p.RegisterPayload(
                daemon_id=self.daemon_id,
                hostname=socket.gethostname(),
                version=VERSION,
                protocol_version=p.PROTOCOL_VERSION,
                executors=[
                    p.ExecutorInfo(name=n, models=e.models) for n, e in self.executors.items()
                ],
                max_concurrent_jobs=self.settings.max_concurrent_jobs,
                labels=self.settings.labels,
                inflight=[
                    p.InflightExecution(execution_id=eid, job_id=jid)
                    for eid, (jid, _) in self.jobs.items()
                ],
            ),
        )

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send(p.encode(self._register_frame()).decode())
        first = p.decode_server_frame(await within(ws.recv(), 30))
        if not isinstance(first, p.DaemonRegistered):
            raise ProtocolViolation(
                f"orchestrator answered daemon:register with {p.frame_type(first)}"
            )
        resumed = set(first.payload.resumed)
        advertised = first.payload.max_frame_bytes
        self.frame_limit = frame_limit(advertised if isinstance(advertised, int) else None)
        self.sessions += 1
        for eid in [e for e in self.jobs if e not in resumed]:
            # Not re-attached: the orchestrator declared it lost. Stop it; what it spent is
            # still reported in its result.
            self._stop(eid)
        self.ws = ws
        log.info("registered as %s (%d frames to resend)", self.daemon_id, len(self.outbox))
        if self.draining:
            await self._send_draining()
        for key, pending in self.outbox.pending():
            await ws.send(self._fitted(key, pending).decode())
        async for message in ws:
            await self._handle(message)

    async def _handle(self, data: str | bytes) -> None:
        try:
            frame = p.decode_server_frame(data)
        except p.ProtocolError as exc:
            log.warning("dropping invalid frame from orchestrator: %s", exc)
            return
        match frame:
            case p.HeartbeatPing():
                await self._send(
                    p.encode(
                        p.make(p.HeartbeatPong, p.PongPayload(active_jobs=len(self.jobs)), frame.id)
                    )
                )
            case p.JobAck():
                key = answered_key(frame.payload.of, frame.id, frame.payload.seq)
                deleted = key is not None and self.outbox.delete(key)
                log.debug("ack %s (%s)", key, "deleted" if deleted else "unknown")
                self.acked.set()
            case p.JobOffer():
                await self._offer(frame)
            case p.JobCancel():
                # Sent again after every reconnect and by the orchestrator's periodic sweep:
                # stopping is idempotent.
                eid = frame.id.lower()
                if eid in self.jobs:
                    self._stop(eid)
                else:
                    self.cancelled_unknown[eid] = None
                    while len(self.cancelled_unknown) > 1024:
                        del self.cancelled_unknown[next(iter(self.cancelled_unknown))]
            case p.Error():
                await self._on_error(frame)

    def _stop(self, eid: str) -> None:
        """Cancel a job's task once: a second cancel would interrupt the result it reports."""
        entry = self.jobs.get(eid)
        if entry is not None and not entry[1].cancelling():
            entry[1].cancel()

    async def _on_error(self, frame: p.Error) -> None:
        """An error about one of our frames: log it, and act when it is final.

        A job frame the orchestrator will never accept (the ledger cannot hold it, or the
        execution is not ours) leaves the outbox as an ack would take it, instead of being
        resent after every reconnect. An accept answered ``not_assigned`` means the offer was
        withdrawn: the job is stopped, and its result still reports what it spent.

        A frame refused as ``invalid_frame`` is never accepted as sent either: a call or tool
        call leaves the outbox; a result is replaced by a minimal one that certainly decodes
        (failed, saying why), so the attempt is decided. The replacement is made once: a
        second refusal in the same session may be of a second copy of the original, and
        leaves it; a refusal in a later session (only the replacement is sent there) removes
        it: nothing is resent forever. A refused call or tool call whose ``seq`` could not be
        read settles nothing (which frame it meant is unknown).
        """
        error = frame.payload
        log.warning("orchestrator error %s: %s (%s)", error.code, error.message, error.path)
        if error.code not in ("not_assigned", "refused_by_database", "invalid_frame"):
            return
        of = error.of if isinstance(error.of, str) else None
        key = answered_key(of, frame.id, error.seq)
        eid = frame.id.lower()
        if error.code == "invalid_frame" and of == "job:result" and key is not None:
            replaced_in = self.refused_results.get(eid)
            if replaced_in is None:
                self.refused_results[eid] = self.sessions
                replacement = p.encode(
                    minimal_result(
                        eid,
                        f"the orchestrator refused this attempt's job:result ({error.code} at "
                        f"{error.path}: {error.message}); the attempt's usage is the sum of its "
                        "recorded calls",
                    )
                )
                if not self.outbox.replace(key, replacement):
                    self.outbox.put(key, eid, replacement)
                await asyncio.shield(self._send(replacement))
                return
            if replaced_in == self.sessions:
                # This session may have carried the refused result twice (resent at
                # registration while also sent live): this refusal may be of the other copy,
                # so the replacement stays. Were it the replacement that was refused, it is
                # sent once more on the next connection, and a refusal there removes it.
                return
        if key is not None:
            self.outbox.delete(key)
            self.acked.set()
        elif error.of == "job:accept" and error.code == "not_assigned":
            entry = self.jobs.get(eid)
            if entry is not None:
                log.warning("offer %s was withdrawn; stopping its job", frame.id)
                entry[1].cancel()

    async def _reject(self, offer: p.JobOffer, reason: str, message: str | None = None) -> None:
        # The message may quote a spec or an exception of any length: fitted to the wire.
        await self._send(
            p.encode(
                p.make(
                    p.JobReject,
                    p.RejectPayload(
                        reason=reason, message=fit_text(message) if message else msgspec.UNSET
                    ),
                    offer.id,
                )
            )
        )

    async def _offer(self, offer: p.JobOffer) -> None:
        payload = offer.payload
        executor = self.executors.get(payload.executor)
        if self.draining:
            await self._reject(offer, "shutting-down")
            return
        if offer.id.lower() in self.cancelled_unknown:
            del self.cancelled_unknown[offer.id.lower()]
            await self._reject(offer, "cancelled", "cancelled before the offer arrived")
            return
        if executor is None:
            await self._reject(offer, "unsupported", f"no executor {payload.executor!r}")
            return
        if len(self.jobs) >= self.settings.max_concurrent_jobs or self.outbox.full:
            await self._reject(offer, "busy", "outbox full" if self.outbox.full else None)
            return
        model = payload.model if isinstance(payload.model, str) else None
        if executor.models and model is not None and model not in executor.models:
            await self._reject(offer, "unsupported", f"model {model!r} not served here")
            return
        try:
            executor.validate(payload.spec, model)
        except SpecError as exc:
            await self._reject(offer, "unsupported", str(exc))
            return
        await self._send(p.encode(p.make(p.JobAccept, p.EmptyPayload(), offer.id)))
        eid = offer.id.lower()
        task = asyncio.create_task(
            run_job(
                executor,
                offer,
                self._emit,
                self.settings.prices,
                self.settings.max_output_bytes,
            )
        )
        self.jobs[eid] = (payload.job_id, task)
        task.add_done_callback(lambda _t: self._job_done(eid))
        # Let the job start before the next frame is read: a task cancelled before its first
        # step never runs run_job, which would leave the execution without a result.
        await asyncio.sleep(0)

    def _job_done(self, eid: str) -> None:
        self.jobs.pop(eid, None)
        if self.draining and not self.jobs:
            self.drained.set()

    async def _send_draining(self) -> None:
        await self._send(
            p.encode(
                p.make(
                    p.DaemonDraining,
                    p.DrainingPayload(active_jobs=len(self.jobs), reason="SIGTERM"),
                )
            )
        )

    # --- lifecycle -------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.settings.orchestrator.startswith("wss://"):
            return None
        ctx = ssl.create_default_context(
            cafile=str(self.settings.ca_file) if self.settings.ca_file else None
        )
        return ctx

    async def _connection_loop(self) -> None:
        headers = {}
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        try:
            async for ws in connect(
                self.settings.orchestrator,
                additional_headers=headers,
                ssl=self._ssl(),
                open_timeout=10,
                ping_interval=None,
                compression=None,
                max_size=None,
            ):
                try:
                    await self._session(ws)
                except (ConnectionClosed, TimeoutError) as exc:
                    log.info("connection lost (%s); reconnecting", exc)
                finally:
                    self.ws = None
                    self.acked.set()  # a drain waiting for acks stops waiting: none can come
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthError(
                    f"orchestrator {self.settings.orchestrator} refused the token ({status})"
                ) from None
            raise

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("draining: finishing %d running jobs", len(self.jobs))
            self.draining = True
            if not self.jobs:
                self.drained.set()
            asyncio.get_running_loop().create_task(self._send_draining())
        else:
            log.info("second signal: cancelling %d jobs", len(self.jobs))
            for _, task in self.jobs.values():
                task.cancel()
        self.stop_now.set()

    async def _wait_drained(self) -> None:
        await self.stop_now.wait()
        with contextlib.suppress(TimeoutError):
            await within(self.drained.wait(), self.settings.drain_timeout)
        for _, task in list(self.jobs.values()):
            task.cancel()
        if self.jobs:
            await asyncio.gather(*(t for _, t in self.jobs.values()), return_exceptions=True)
        # Wait for the last acks so nothing needs a resend on the next start; without a
        # connection no ack can come, so the outbox is kept as it is and we stop at once.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.ack_timeout
        while len(self.outbox) and loop.time() < deadline and self.ws is not None:
            self.acked.clear()
            with contextlib.suppress(TimeoutError):
                await within(self.acked.wait(), max(0.01, deadline - loop.time()))
        if self.ws is not None:
            await self.ws.close(1000, "daemon stopping")

    async def run(self) -> int:
        """Work until drained by SIGTERM/SIGINT; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        conn = asyncio.create_task(self._connection_loop())
        drain = asyncio.create_task(self._wait_drained())
        done, _ = await asyncio.wait({conn, drain}, return_when=asyncio.FIRST_COMPLETED)
        if conn in done:
            drain.cancel()
            conn.result()  # raises AuthError and the like
            return 1
        conn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await conn
        left = len(self.outbox)
        self.outbox.close()
        if left:
            log.warning("%d frames still unacknowledged; they are resent on the next start", left)
        log.info("stopped (pid %d)", os.getpid())
        return 0

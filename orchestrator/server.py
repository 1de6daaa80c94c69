"""``tally serve``: the WebSocket endpoint, HTTP probes and metrics, and the side tasks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import ssl
from dataclasses import dataclass
from http import HTTPStatus

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from orchestrator.config import ServeSettings
from orchestrator.connections import ClientHandler, Context, DaemonHandler
from orchestrator.hub import Hub, send
from orchestrator.ingest import TRANSIENT, Writer
from orchestrator.metrics import Metrics
from orchestrator.store import JobStore, LedgerStore
from orchestrator.store import migrations as migrate
from orchestrator.store.db import connect, create_pool
from orchestrator.store.ledger import BatchOutcome
from shared import protocol as p
from shared.aio import within
from shared.errors import StoreError

log = logging.getLogger("tally.server")

FIRST_FRAME_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Peer:
    """Who authenticated at the handshake: ``daemon``, ``client`` or ``any`` (insecure mode,
    no tokens configured), and the token it presented (None in insecure mode)."""

    role: str
    token: str | None = None


def bearer_role(headers: Headers, settings: ServeSettings) -> Peer | None:
    """The peer an ``Authorization: Bearer`` header authenticates, or None (refused: 401).

    The scheme is matched case-insensitively, as HTTP authentication schemes are (RFC 9110
    section 11.1). A peer without a token is let in only in insecure mode with no token
    configured at all, which ``ServeSettings.validate`` allows only on loopback.
    """
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return Peer("any") if settings.insecure and not settings.has_tokens and not value else None
    raw = token.strip().encode()
    peer = None
    # Compare against every token so timing does not tell which list matched.
    for candidate in settings.all_daemon_tokens:
        if hmac.compare_digest(raw, candidate.encode()):
            peer = Peer("daemon", candidate)
    for candidate in settings.client_tokens:
        if hmac.compare_digest(raw, candidate.encode()):
            peer = Peer("client", candidate)
    return peer


class Service:
    """One orchestrator process: wires the stores, writer, hub and server together."""

    def __init__(self, settings: ServeSettings, migrate_schema: bool = False) -> None:
        self.settings = settings
        self.migrate_schema = migrate_schema
        self.metrics = Metrics(settings.label_cap)
        self.db_ok = False
        self.draining = False
        self.stopped = asyncio.Event()
        self.port: int | None = None
        self._pool: asyncpg.Pool | None = None
        self._server: Server | None = None
        self._pending_publish: set[str] = set()
        self._publish_wake = asyncio.Event()

    # --- readiness -------------------------------------------------------------------------

    def ready(self) -> bool:
        """Ready when the database answers, the writer commits and we are not draining."""
        return self.db_ok and not self.draining and not self._writer_stalled()

    def _writer_stalled(self) -> bool:
        writer = getattr(self, "writer", None)
        return writer is not None and writer.stalled_for() > self.settings.writer_stall_timeout

    def _set_db_ok(self, ok: bool) -> None:
        self.db_ok = ok

    # --- HTTP ------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.ready():
                return connection.respond(HTTPStatus.OK, "ready\n")
            if self.draining:
                why = "draining"
            elif self._writer_stalled():
                why = (
                    f"ledger writer has not committed for {self.writer.stalled_for():.0f}s "
                    "(see the log for the failing statement)"
                )
            else:
                why = "database unavailable"
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {why}\n")
        if path == "/metrics":
            response = connection.respond(
                HTTPStatus.OK, generate_latest(self.metrics.registry).decode()
            )
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return response
        if path != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if bearer_role(request.headers, self.settings) is None:
            self.metrics.frames_rejected.labels("unauthorized").inc()
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="tally"'
            return response
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        peer = bearer_role(ws.request.headers, self.settings)
        if peer is None:  # tokens changed between the handshake's two reads: impossible
            return
        try:
            first = await within(ws.recv(), FIRST_FRAME_TIMEOUT)
        except (TimeoutError, ConnectionClosed):
            return
        if peer.role == "daemon" or (
            peer.role == "any" and p.peek_type(first) == "daemon:register"
        ):
            await DaemonHandler(self.ctx, ws, peer.token).run(first)
        else:
            await ClientHandler(self.ctx, ws).run(first)

    # --- side tasks ------------------------------------------------------------------------

    def _on_committed(self, outcome: BatchOutcome) -> None:
        self.metrics.record_batch(outcome)
        for eid in outcome.freed_executions:
            self.hub.release(eid)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        # One line per changed job: "<job id> <status> <cancel|->" (older schemas appended
        # the queue; it is ignored).
        for line in payload.split("\n"):
            parts = line.split(" ", 3)
            if len(parts) < 3:
                continue
            job_id, status, cancel = parts[0], parts[1], parts[2]
            if status == "queued":
                self.hub.wake.set()
            if cancel == "cancel" and status == "running":
                self._cancel_locally(job_id)
            if job_id in self.hub.watchers:
                self._pending_publish.add(job_id)
                self._publish_wake.set()

    def _cancel_locally(self, job_id: str) -> None:
        local = self.hub.session_for_job(job_id)
        if local is not None:
            session, eid = local
            asyncio.get_running_loop().create_task(
                send(
                    session.ws,
                    p.JobCancel(
                        id=eid,
                        timestamp=p.now_ms(),
                        payload=p.CancelPayload(reason="cancelled by client"),
                    ),
                )
            )

    async def _listen(self) -> None:
        """Hold a LISTEN connection; reconnect after database outages."""
        backoff = 0.2
        while True:
            try:
                conn = await connect(self.settings.database_url)
            except StoreError as exc:
                log.debug("listen connect failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = 0.2
            closed = asyncio.Event()
            conn.add_termination_listener(lambda _c, ev=closed: ev.set())
            try:
                await conn.add_listener("tally_jobs", self._on_notify)
                self.hub.wake.set()  # notifications may have been missed meanwhile
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await within(closed.wait(), 5.0)
                    if not closed.is_set():
                        try:
                            await conn.execute("SELECT 1")
                        except TRANSIENT:
                            break
            except TRANSIENT as exc:
                log.debug("listen connection lost: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)

    async def _publisher(self) -> None:
        while True:
            await self._publish_wake.wait()
            self._publish_wake.clear()
            batch, self._pending_publish = list(self._pending_publish), set()
            try:
                await self.hub.publish(batch)
            except TRANSIENT as exc:
                log.debug("publish failed: %s", exc)

    async def _reaper(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.reap_interval)
            try:
                running = [eid for d in self.hub.daemons.values() for eid in d.running]
                await within(self.jobs.extend_leases(running, s.lease_timeout), 10)
                for r in await within(self.jobs.reap(), 10):
                    self.hub.release(r.execution_id)
                    if r.lost:
                        self.metrics.executions_lost.inc()
                        log.warning(
                            "execution %s of job %s lost; job %s",
                            r.execution_id,
                            r.job_id,
                            r.job_status,
                        )
                    if r.job_status in ("failed", "cancelled"):
                        self.metrics.count_job(r.executor, r.job_status)
            except (*TRANSIENT, asyncpg.InternalClientError) as exc:
                log.debug("reaper: database unavailable: %s", exc)

    async def _snapshot(self) -> None:
        while True:
            try:
                queued = await within(self.jobs.queued_by_queue(), 2.0)
                self._set_db_ok(True)
                await self.jobs.touch_daemons(list(self.hub.daemons))
            except Exception as exc:
                log.debug("snapshot: database unavailable: %r", exc)
                self._set_db_ok(False)
                queued = self.metrics.snapshot[0]
            self.metrics.snapshot = (queued, len(self.hub.daemons), self.hub.slot_snapshot())
            await asyncio.sleep(self.settings.snapshot_interval)

    # --- lifecycle -------------------------------------------------------------------------

    async def _prepare_database(self) -> None:
        files = migrate.discover()
        conn = await connect(self.settings.database_url)
        try:
            if self.migrate_schema:
                await migrate.up(conn, files)
            await migrate.check_current(conn, files)
        finally:
            await conn.close()

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
        return ctx

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Serve until ``stop()`` or SIGTERM/SIGINT; drain, then return."""
        s = self.settings
        await self._prepare_database()
        self._pool = await create_pool(s.database_url, min_size=2, max_size=s.pool_size)
        self.db_ok = True
        self.jobs = JobStore(self._pool, s.requeue_backoff)
        self.hub = Hub(s, self.jobs, self.metrics)
        self.ledgers = [LedgerStore(s.database_url) for _ in range(s.writer_connections)]
        self.writer = Writer(
            self.ledgers,
            self.metrics,
            self._set_db_ok,
            self._on_committed,
            max_rows=s.batch_max_rows,
            max_delay=s.batch_max_delay,
        )
        self.ctx = Context(self.hub, self.jobs, self.writer, self.metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
        try:
            server = await serve(
                self._handler,
                s.host,
                s.port,
                process_request=self._process_request,
                max_size=s.max_frame_bytes,
                ssl=self._ssl_context(),
                compression=None,
                ping_interval=None,
                max_queue=64,
            )
            self._server = server
            self.port = next(iter(server.sockets)).getsockname()[1]
            log.info("serving on %s:%d", s.host, self.port)
            async with asyncio.TaskGroup() as tg:
                side = [
                    tg.create_task(self.writer.run()),
                    tg.create_task(self.hub.run_dispatcher()),
                    tg.create_task(self._listen()),
                    tg.create_task(self._publisher()),
                    tg.create_task(self._reaper()),
                    tg.create_task(self._snapshot()),
                ]
                if started is not None:
                    started.set()
                await self.stopped.wait()
                await self._drain(server)
                for task in side:
                    task.cancel()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            for ledger in self.ledgers:
                await ledger.close()
            try:
                await within(self._pool.close(), 5)
            except (TimeoutError, *TRANSIENT):
                self._pool.terminate()

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        self.stopped.set()

    async def _drain(self, server: Server) -> None:
        """Stop accepting and offering, persist what is in flight, close with 1001."""
        self.draining = True
        self.hub.accepting = False
        server.close(close_connections=False)
        with contextlib.suppress(TimeoutError):
            await within(self.writer.wait_idle(), self.settings.drain_timeout)
        for session in list(self.hub.daemons.values()):
            with contextlib.suppress(Exception):
                await session.ws.close(1001, "orchestrator going away")
        server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            await within(server.wait_closed(), self.settings.drain_timeout)

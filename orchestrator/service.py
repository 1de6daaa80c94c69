"""``tally serve``: one orchestrator process, its parts wired together, run and drained.

Parts receive what they need through their constructors: the store, the dispatch dispatcher, the
ingest path, the notifier and the upkeep loops; none reaches back into the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from orchestrator.api import UsageApi
from orchestrator.client_link import ClientHandler
from orchestrator.config import ServeSettings
from orchestrator.daemon_link import Context, DaemonHandler
from orchestrator.dispatch import Dispatcher
from orchestrator.http import HttpFront
from orchestrator.ingest import Writer
from orchestrator.metrics import Metrics
from orchestrator.notify import Notifier
from orchestrator.store import JobStore, LedgerStore
from orchestrator.store import migrations as migrate
from orchestrator.store.db import TRANSIENT, connect, create_pool
from orchestrator.upkeep import Upkeep
from shared import protocol as p
from shared.aio import within
from shared.protocol import CloseCode

if TYPE_CHECKING:
    from orchestrator.export.exporter import OtlpExporter

log = logging.getLogger(__name__)

FIRST_FRAME_TIMEOUT = 30.0


@dataclass(slots=True)
class Parts:
    """What a running service is made of, built once the database answers."""

    pool: asyncpg.Pool
    # The usage API's own connections: its readers never wait for, or hold, the pool that
    # accepts, lease renewals and claims use.
    api_pool: asyncpg.Pool
    jobs: JobStore
    dispatcher: Dispatcher
    ledgers: list[LedgerStore]
    writer: Writer
    ctx: Context
    notifier: Notifier
    upkeep: Upkeep
    exporter: OtlpExporter | None = None


class Service:
    """One orchestrator process: wires the stores, writer, dispatcher and server together."""

    def __init__(self, settings: ServeSettings, migrate_schema: bool = False) -> None:
        self.settings = settings
        self.migrate_schema = migrate_schema
        self.metrics = Metrics(settings.label_cap)
        self.db_ok = False
        self.draining = False
        self.stopped = asyncio.Event()
        self.port: int | None = None
        self.front = HttpFront(settings, self.metrics, self.unready_reason)
        self.parts: Parts | None = None  # built in run(), once the database answers

    # --- readiness -------------------------------------------------------------------------

    def unready_reason(self) -> str | None:
        """Why /readyz answers 503, or None when the database answers, the writer commits and
        the service is not draining."""
        if self.draining:
            return "draining"
        writer = self.parts.writer if self.parts is not None else None
        if writer is not None and writer.stalled_for() > self.settings.writer_stall_timeout:
            return (
                f"ledger writer has not committed for {writer.stalled_for():.0f}s "
                "(see the log for the failing statement)"
            )
        if not self.db_ok:
            return "database unavailable"
        return None

    def ready(self) -> bool:
        """Whether /readyz answers 200."""
        return self.unready_reason() is None

    def _set_db_ok(self, ok: bool) -> None:
        self.db_ok = ok

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        peer = self.front.peers.pop(ws, None)
        parts = self.parts
        if peer is None or parts is None:  # authenticated at the handshake; built before serving
            return
        try:
            first = await within(ws.recv(), FIRST_FRAME_TIMEOUT)
        except (TimeoutError, ConnectionClosed):
            return
        if peer.role == "daemon" or (
            peer.role == "any" and p.peek_type(first) == "daemon:register"
        ):
            await DaemonHandler(parts.ctx, ws, peer.token).run(first)
        else:
            await ClientHandler(parts.ctx, ws).run(first)

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
        parts = self.parts = await self._build()
        api = self.front.api = UsageApi(parts.api_pool, s, parts.jobs.closed_spend)
        self.db_ok = True
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
        try:
            server = await serve(
                self._handler,
                s.host,
                s.port,
                process_request=self.front.process_request,
                max_size=s.max_frame_bytes,
                ssl=self._ssl_context(),
                compression=None,
                ping_interval=None,
                max_queue=64,
                # An HTTP answer is part of the handshake: leave the API its whole deadline.
                open_timeout=max(10.0, s.api_deadline),
            )
            self.port = next(iter(server.sockets)).getsockname()[1]
            log.info("serving on %s:%d", s.host, self.port)
            async with asyncio.TaskGroup() as tg:
                side = [
                    tg.create_task(parts.writer.run()),
                    tg.create_task(parts.dispatcher.run_dispatcher()),
                    tg.create_task(parts.notifier.listen()),
                    tg.create_task(parts.notifier.publisher()),
                    tg.create_task(parts.upkeep.reaper()),
                    tg.create_task(parts.upkeep.cancel_sweep()),
                    tg.create_task(parts.upkeep.snapshot()),
                    tg.create_task(parts.upkeep.fold_rollups()),
                ]
                if parts.exporter is not None:
                    side.append(tg.create_task(parts.exporter.run()))
                if started is not None:
                    started.set()
                await self.stopped.wait()
                await self._drain(server, parts)
                for task in side:
                    task.cancel()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            if parts.exporter is not None:
                await asyncio.to_thread(parts.exporter.close)
            api.close()
            for ledger in parts.ledgers:
                await ledger.close()
            for pool in (parts.api_pool, parts.pool):
                try:
                    await within(pool.close(), 5)
                except (TimeoutError, *TRANSIENT):
                    pool.terminate()

    async def _build(self) -> Parts:
        s = self.settings
        pool = await create_pool(s.database_url, min_size=2, max_size=s.pool_size)
        api_pool = await create_pool(
            s.database_url,
            min_size=1,
            max_size=s.api_pool_size,
            server_settings={
                "application_name": "tally-api",
                "statement_timeout": str(max(1, round(s.api_statement_timeout * 1000))),
                # Reports read only; and without parallel workers the API keeps to at most
                # --api-pool-size server processes, leaving the rest of the CPU to the ledger.
                "default_transaction_read_only": "on",
                "max_parallel_workers_per_gather": "0",
            },
        )
        jobs = JobStore(pool, s.requeue_backoff, s.budget_clock, s.budget_recheck)
        dispatcher = Dispatcher(s, jobs, self.metrics)
        exporter = None
        release: Callable[[str], None] = dispatcher.release
        if s.otlp is not None:
            from orchestrator.export.exporter import OtlpExporter

            exporter = OtlpExporter(s.otlp, s.database_url, self.metrics, s.orchestrator_id)

            def release(execution_id: str) -> None:
                dispatcher.release(execution_id)
                exporter.nudge()  # a result was recorded: export it now, not at the next poll

        ledgers = [
            LedgerStore(
                s.database_url,
                retry_backoff=s.requeue_backoff,
                max_output_bytes=s.max_output_bytes,
                usage_events=s.usage_events,
            )
            for _ in range(s.writer_connections)
        ]
        writer = Writer(
            ledgers,
            self.metrics,
            self._set_db_ok,
            release,
            max_rows=s.batch_max_rows,
            max_delay=s.batch_max_delay,
        )
        return Parts(
            pool=pool,
            api_pool=api_pool,
            jobs=jobs,
            dispatcher=dispatcher,
            ledgers=ledgers,
            writer=writer,
            ctx=Context(dispatcher, jobs, writer, self.metrics),
            notifier=Notifier(s.database_url, dispatcher),
            upkeep=Upkeep(s, jobs, dispatcher, self.metrics, self._set_db_ok),
            exporter=exporter,
        )

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        self.stopped.set()

    async def _drain(self, server: Server, parts: Parts) -> None:
        """Stop accepting and offering, persist what is in flight, close with 1001."""
        self.draining = True
        parts.dispatcher.accepting = False
        server.close(close_connections=False)
        with contextlib.suppress(TimeoutError):
            await within(parts.writer.wait_idle(), self.settings.drain_timeout)
        for session in list(parts.dispatcher.daemons.values()):
            with contextlib.suppress(Exception):
                await session.ws.close(CloseCode.GOING_AWAY, "orchestrator going away")
        server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            await within(server.wait_closed(), self.settings.drain_timeout)

"""The OTLP exporter of ``tally serve``: reads decided attempts from the ledger after they
committed, sends their spans over OTLP/HTTP, marks them exported, then records their calls
in the OTLP metrics.

It never touches the ingest path. It has its own connection, it sends from a worker thread,
and while the endpoint is unreachable it backs off while the ledger keeps the backlog. A
restart resumes from what the ledger says was not exported. One orchestrator exports at a
time (a session advisory lock); the others stand by and take over if it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import asyncpg
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from orchestrator.config import OtlpSettings
from orchestrator.export import queue
from orchestrator.export.instruments import Instruments
from orchestrator.export.spans import attempt_spans
from orchestrator.metrics import Metrics
from orchestrator.store.db import CONNECT_ERRORS, describe_dsn

log = logging.getLogger("tally.otlp")

# pg_try_advisory_lock key of the exporting orchestrator ("tallyotl").
LOCK_KEY = 0x74616C6C796F746C


def signal_url(endpoint: str | None, signal: str) -> str | None:
    """``endpoint`` + ``/v1/<signal>``, as the SDK builds it from OTEL_EXPORTER_OTLP_ENDPOINT."""
    if endpoint is None:
        return None
    return f"{endpoint.rstrip('/')}/v1/{signal}"


class OtlpExporter:
    """Exports the ledger's decided attempts as spans and metrics."""

    def __init__(self, settings: OtlpSettings, dsn: str, metrics: Metrics) -> None:
        self.settings = settings
        self.dsn = dsn
        self.metrics = metrics
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
        self.resource = Resource.create({"service.name": "tally"})
        self.spans = OTLPSpanExporter(endpoint=signal_url(settings.endpoint, "traces"))
        self.reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=signal_url(settings.endpoint, "metrics")),
            export_interval_millis=None
            if settings.metrics_interval is None
            else settings.metrics_interval * 1000,
        )
        self.provider = MeterProvider(resource=self.resource, metric_readers=[self.reader])
        self.instruments = Instruments(self.provider)
        self._nudged = asyncio.Event()
        self._backoff = settings.poll_interval

    def nudge(self) -> None:
        """Something was decided: look for it now rather than at the next poll."""
        self._nudged.set()

    async def run(self) -> None:
        """Export until cancelled; reconnect after a database outage."""
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10, command_timeout=30)
            except CONNECT_ERRORS as exc:
                log.debug("otlp: cannot connect to %s: %s", describe_dsn(self.dsn), exc)
                await asyncio.sleep(self.settings.max_backoff)
                continue
            try:
                await self._lead(conn)
            except (*CONNECT_ERRORS, asyncpg.InterfaceError) as exc:
                log.warning("otlp: database unavailable, retrying: %s", exc)
                await asyncio.sleep(self.settings.poll_interval)
            finally:
                self.metrics.otlp_leader.set(0)
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))

    async def _lead(self, conn: asyncpg.Connection) -> None:
        """Wait to be the exporting orchestrator, then export."""
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            self.metrics.otlp_leader.set(0)
            await asyncio.sleep(self.settings.poll_interval * 5)
        self.metrics.otlp_leader.set(1)
        skipped_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() - skipped_at > 60:
                skipped_at = loop.time()
                cutoff = datetime.now(UTC) - timedelta(hours=self.settings.backlog_hours)
                skipped = await queue.skip_older(conn, cutoff)
                if skipped:
                    log.warning("otlp: %d attempts older than the backlog skipped", skipped)
                    self.metrics.otlp_skipped.inc(skipped)
            attempts = await queue.pending(conn, self.settings.batch)
            if not attempts:
                self.metrics.otlp_backlog.set(0)
                await self._wait(self.settings.poll_interval)
                continue
            if await self._send(attempts):
                marked = await queue.mark_exported(conn, attempts)
                for attempt in marked:
                    self.instruments.record(attempt)
                self.metrics.otlp_exported.inc(len(marked))
                self._backoff = self.settings.poll_interval
                if len(attempts) < self.settings.batch:
                    self.metrics.otlp_backlog.set(await queue.backlog(conn))
            else:
                self.metrics.otlp_backlog.set(await queue.backlog(conn))
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, self.settings.max_backoff)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudged.wait(), seconds)
        self._nudged.clear()

    async def _send(self, attempts: list[queue.Attempt]) -> bool:
        """Send the attempts' spans; False when the endpoint did not take them."""
        spans: list[ReadableSpan] = []
        for attempt in attempts:
            spans.extend(attempt_spans(attempt, self.resource, self.settings.label_prefix))
        try:
            result = await asyncio.to_thread(self.spans.export, spans)
        except Exception as exc:  # the SDK logs and returns FAILURE; anything else is the same
            log.warning("otlp: span export raised %s: %s", type(exc).__name__, exc)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.metrics.otlp_spans.inc(len(spans))
            return True
        self.metrics.otlp_failures.inc()
        return False

    def close(self) -> None:
        """Flush the metrics and close the exporters (a bounded wait)."""
        with contextlib.suppress(Exception):
            self.provider.shutdown(timeout_millis=5000)
        with contextlib.suppress(Exception):
            self.spans.shutdown()  # type: ignore[no-untyped-call]

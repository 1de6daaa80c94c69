"""The OTLP exporter of ``tally serve``: reads decided attempts from the ledger after they
committed, sends their spans over OTLP/HTTP, marks them exported, then records their calls
in the OTLP metrics.

It never touches the ingest path. It has its own connection, it sends from a worker thread,
and while the endpoint is unreachable it backs off while the ledger keeps the backlog. A
restart resumes from what the ledger says was not exported. One orchestrator exports at a
time (a session advisory lock); the others stand by and take over if it goes.

A request the endpoint refuses for itself (over its body limit, HTTP 413; or 400 for its
content, while it takes an empty request) is split in halves until each part is taken, so one
large attempt never holds back the ones decided after it; a span refused even alone is
dropped, logged and counted. Any other failure (429, 5xx, no answer, bad credentials: a
collector pushing back or down) is an outage: back off, nothing split, nothing dropped.
Each exporter's metric streams carry its own ``service.instance.id``: a new leader's
cumulative counters are a new stream beside the old leader's, never a conflicting one, and
hold only what it exported itself (see :mod:`orchestrator.export.queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import asyncpg
import requests
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from orchestrator.config import OtlpSettings
from orchestrator.export import queue
from orchestrator.export.instruments import Instruments
from orchestrator.export.spans import attempt_spans
from orchestrator.metrics import Metrics
from orchestrator.store.db import CONNECT_ERRORS, describe_dsn

log = logging.getLogger(__name__)

# pg_try_advisory_lock key of the exporting orchestrator ("tallyotl").
LOCK_KEY = 0x74616C6C796F746C

# Full batches sent whole, after a refusal halved the batch, before it doubles again.
REGROW_AFTER = 8


def signal_url(endpoint: str | None, signal: str) -> str | None:
    """``endpoint`` + ``/v1/<signal>``, as the SDK builds it from OTEL_EXPORTER_OTLP_ENDPOINT."""
    if endpoint is None:
        return None
    return f"{endpoint.rstrip('/')}/v1/{signal}"


def export_resource(instance_id: str) -> Resource:
    """The export's resource: ``service.name`` ``tally`` and ``service.instance.id`` this
    process's id, each overridden by OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (an
    instance id set there must differ between orchestrators: warned at start)."""
    environment = OTELResourceDetector().detect().attributes
    inherited = environment.get("service.instance.id")
    if inherited is not None:
        log.warning(
            "otlp: service.instance.id %r comes from OTEL_RESOURCE_ATTRIBUTES, not this "
            "orchestrator's id %r: give every orchestrator its own, or their cumulative "
            "metric streams clash",
            inherited,
            instance_id,
        )
    return Resource.create(
        {"service.name": "tally", "service.instance.id": instance_id, **environment}
    )


class StatusSession(requests.Session):
    """The span exporter's HTTP session, keeping the status of its last answer (None when
    none came: refused, reset, timed out). The SDK's ``export`` says only SUCCESS or
    FAILURE; the status tells a request refused for itself from an endpoint pushing back.
    One request at a time (the exporter sends from one worker thread, one after another)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_status: int | None = None

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        """``requests.Session.request``, remembering the answer's status."""
        self.last_status = None
        response = super().request(*args, **kwargs)
        self.last_status = response.status_code
        return response


class OtlpExporter:
    """Exports the ledger's decided attempts as spans and metrics."""

    def __init__(
        self,
        settings: OtlpSettings,
        dsn: str,
        metrics: Metrics,
        instance_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.metrics = metrics
        # One stream per process: two orchestrators (or one before and after a restart)
        # never report one cumulative series from different starting points.
        self.instance_id = instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.resource = export_resource(self.instance_id)
        # A session of our own (the SDK's constructor takes one): the status of each answer.
        self.session = StatusSession()
        self.spans = OTLPSpanExporter(
            endpoint=signal_url(settings.endpoint, "traces"), session=self.session
        )
        self._status: int | None = None  # of the last span request
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
        # Attempts read per batch: halved when the endpoint refuses a batch for its size,
        # doubled back after REGROW_AFTER full batches it took whole.
        self._limit = settings.batch
        self._whole = 0
        self._refusals = 0

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
            limit = self._limit
            attempts = await queue.pending(conn, limit)
            if not attempts:
                self.metrics.otlp_backlog.set(0)
                await self._wait(self.settings.poll_interval)
                continue
            refusals = self._refusals
            never_ran = [a for a in attempts if not a.ran]
            if never_ran:  # offers declined or timed out and never run: nothing to send
                await queue.mark_exported(conn, never_ran)
            ran = [a for a in attempts if a.ran]
            if not ran or await self._export(conn, ran):
                self._backoff = self.settings.poll_interval
                self._adapt(len(attempts), limit, refused=self._refusals > refusals)
                if len(attempts) < limit:
                    self.metrics.otlp_backlog.set(await queue.backlog(conn))
            else:
                self.metrics.otlp_failures.inc()
                self.metrics.otlp_backlog.set(await queue.backlog(conn))
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, self.settings.max_backoff)

    def _adapt(self, sent: int, limit: int, refused: bool) -> None:
        """Read smaller batches after a refused one; back to full size once they fit."""
        if refused and sent > 1:
            self._limit, self._whole = max(1, sent // 2), 0
        elif not refused and sent == limit and limit < self.settings.batch:
            self._whole += 1
            if self._whole >= REGROW_AFTER:
                self._limit, self._whole = min(self.settings.batch, limit * 2), 0

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._nudged.wait(), seconds)
        self._nudged.clear()

    async def _export(self, conn: asyncpg.Connection, attempts: list[queue.Attempt]) -> bool:
        """Send the attempts' spans and mark them exported; False when the endpoint failed
        (down, 5xx, timeout: back off and send them again).

        A request the endpoint refuses while it is up is split: the attempts in halves, one
        attempt alone in halves of its spans (:meth:`_send_pieces`).
        """
        if await self._send(self._spans(attempts)):
            await self._mark(conn, attempts)
            return True
        if not await self._refused():
            return False
        if len(attempts) == 1:
            dropped = await self._send_pieces(self._spans(attempts), attempts[0])
            if dropped is None:
                return False
            self.metrics.otlp_dropped.inc(dropped)
            await self._mark(conn, attempts)
            return True
        log.warning(
            "otlp: the endpoint refused the spans of %d attempts in one request (over its "
            "body limit?): sending them in halves",
            len(attempts),
        )
        half = len(attempts) // 2
        return await self._export(conn, attempts[:half]) and await self._export(
            conn, attempts[half:]
        )

    async def _send_pieces(self, spans: list[ReadableSpan], attempt: queue.Attempt) -> int | None:
        """Send an attempt's spans the endpoint refused together, in halves until each part
        is taken; return how many it refused even alone (dropped), None when it failed."""
        if len(spans) == 1:
            # Once more, and the endpoint asked again: a failure that merely passed while
            # the empty request went through is not taken for a refusal.
            if await self._send(spans):
                return 0
            if not await self._refused():
                return None
            [span] = spans
            log.warning(
                "otlp: the endpoint refused span %s (%r) of attempt %s of job %s even alone: "
                "not exported (the ledger keeps it)",
                f"{span.context.span_id:016x}" if span.context is not None else "?",
                span.name,
                attempt.id,
                attempt.job_id,
            )
            return 1
        dropped = 0
        half = len(spans) // 2
        for part in (spans[:half], spans[half:]):
            if await self._send(part):
                continue
            if not await self._refused():
                return None
            more = await self._send_pieces(part, attempt)
            if more is None:
                return None
            dropped += more
        return dropped

    async def _refused(self) -> bool:
        """After a failed request: whether the endpoint refused that request for itself
        rather than failing, decided on the answer's status.

        413 (over a body limit) is a refusal. 400 (refused for its content) is one only if
        the endpoint takes an empty request now: one that answers 400 to everything is
        failing. Anything else (429 and 5xx: a collector pushing back, out of memory or
        quota, though it may take an empty request; no answer; 401/403/404) is a failure:
        back off and send again, nothing split, nothing dropped."""
        if self._status == HTTPStatus.BAD_REQUEST:
            if not await self._send([]):
                return False
        elif self._status != HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            return False
        self._refusals += 1
        self.metrics.otlp_refused.inc()
        return True

    async def _mark(self, conn: asyncpg.Connection, attempts: list[queue.Attempt]) -> None:
        """Mark the attempts exported and record, in the metrics, the calls of those this
        exporter marked (one exporter marks a row version: a call is counted once)."""
        marked = await queue.mark_exported(conn, attempts)
        for attempt in marked:
            self.instruments.record(attempt)
        self.metrics.otlp_exported.inc(len(marked))

    def _spans(self, attempts: list[queue.Attempt]) -> list[ReadableSpan]:
        spans: list[ReadableSpan] = []
        for attempt in attempts:
            spans.extend(attempt_spans(attempt, self.resource, self.settings.label_prefix))
        return spans

    async def _send(self, spans: list[ReadableSpan]) -> bool:
        """Send spans in one request; False when the endpoint did not take them."""
        try:
            result, self._status = await asyncio.to_thread(self._export_now, spans)
        except Exception as exc:  # the SDK logs and returns FAILURE; anything else is the same
            log.warning("otlp: span export raised %s: %s", type(exc).__name__, exc)
            result, self._status = SpanExportResult.FAILURE, None
        if result is SpanExportResult.SUCCESS:
            self.metrics.otlp_spans.inc(len(spans))
            return True
        return False

    def _export_now(self, spans: list[ReadableSpan]) -> tuple[SpanExportResult, int | None]:
        """On the worker thread: export, and the status of the answer it ended with."""
        result = self.spans.export(spans)
        return result, self.session.last_status

    def close(self) -> None:
        """Flush the metrics and close the exporters (a bounded wait)."""
        with contextlib.suppress(Exception):
            self.provider.shutdown(timeout_millis=5000)
        with contextlib.suppress(Exception):
            self.spans.shutdown()  # type: ignore[no-untyped-call]

"""Upkeep: leases renewed and expired, the snapshot the gauges and readiness read, and the
rollups' past hours folded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from orchestrator.config import ServeSettings
from orchestrator.dispatch import Hub
from orchestrator.metrics import Metrics
from orchestrator.store import JobStore, cancels, retention
from orchestrator.store.db import TRANSIENT
from shared.aio import within

log = logging.getLogger("tally.upkeep")

# How often the reaper's sweep tells one execution again that its job was cancelled.
CANCEL_RESEND_INTERVAL = 5.0


class Upkeep:
    """The reaper (leases) and the snapshot (gauges, database readiness)."""

    def __init__(
        self,
        settings: ServeSettings,
        jobs: JobStore,
        hub: Hub,
        metrics: Metrics,
        set_db_ok: Callable[[bool], None],
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.hub = hub
        self.metrics = metrics
        self.set_db_ok = set_db_ok
        self._cancels_sent: dict[str, float] = {}  # execution id -> when the sweep told it

    async def reaper(self) -> None:
        """Renew the leases of live executions; expire the others (lost, offers rejected)."""
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
                await within(self.resend_cancels(), 10)
            except TRANSIENT as exc:
                log.debug("reaper: database unavailable: %s", exc)

    async def resend_cancels(self) -> None:
        """Tell daemons again to stop executions whose job a client cancelled.

        The notification that relays a cancel can be lost (the listener reconnecting, the
        offer not yet attached, a link dying before it noticed); the flag in the database is
        not. Each execution is told at most once per ``CANCEL_RESEND_INTERVAL``; the daemon
        stops a job once, however often it is told.
        """
        sent, held = self._cancels_sent, self.hub.owner
        for eid in [e for e in sent if e not in held]:
            del sent[eid]
        now = time.monotonic()
        due = [
            eid
            for d in self.hub.daemons.values()
            for eid in d.executions
            if eid not in sent or now - sent[eid] >= CANCEL_RESEND_INTERVAL
        ]
        for eid, job_id in await cancels.pending(self.jobs.pool, due):
            if await self.hub.cancel(eid):
                sent[eid] = time.monotonic()
                log.debug("cancel of job %s sent (again) for execution %s", job_id, eid)

    async def fold_rollups(self, interval: float = 60.0) -> None:
        """Fold past hours' rollup shards into one row per key (reports read fewer rows)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await within(retention.fold_rollup_shards(self.jobs.pool), 60)
            except (TimeoutError, *TRANSIENT) as exc:
                log.debug("fold_rollups: database unavailable: %s", exc)

    async def snapshot(self) -> None:
        """Refresh the gauges' snapshot and the database readiness every few seconds."""
        while True:
            try:
                queued = await within(self.jobs.queued_by_queue(), 2.0)
                self.set_db_ok(True)
                await self.jobs.touch_daemons(list(self.hub.daemons))
                self.metrics.budgets = await within(self.jobs.budget_report(), 5.0)
            except Exception as exc:
                log.debug("snapshot: database unavailable: %r", exc)
                self.set_db_ok(False)
                queued = self.metrics.snapshot[0]
            self.metrics.snapshot = (queued, len(self.hub.daemons), self.hub.slot_snapshot())
            await asyncio.sleep(self.settings.snapshot_interval)

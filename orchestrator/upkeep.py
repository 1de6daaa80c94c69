"""Upkeep: leases renewed and expired, the snapshot the gauges and readiness read, and the
rollups' past hours folded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from orchestrator.config import ServeSettings
from orchestrator.dispatch import Hub
from orchestrator.metrics import Metrics
from orchestrator.store import JobStore, retention
from orchestrator.store.db import TRANSIENT
from shared.aio import within

log = logging.getLogger("tally.upkeep")


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
            except TRANSIENT as exc:
                log.debug("reaper: database unavailable: %s", exc)

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

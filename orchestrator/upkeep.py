"""Upkeep: leases renewed and expired, cancels told again, the snapshot the gauges and
readiness read, and the rollups' past hours folded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from orchestrator.config import ServeSettings
from orchestrator.dispatch import Dispatcher
from orchestrator.metrics import Metrics
from orchestrator.store import JobStore, cancels, retention
from orchestrator.store.db import TRANSIENT
from shared.aio import within

log = logging.getLogger(__name__)

# How often the cancel sweep tells the executions of cancelled jobs again to stop.
CANCEL_SWEEP_INTERVAL = 5.0
# Longest extra pause of a side loop after failures that are not an outage, doubling from
# half a second: a statement that keeps failing is logged every few seconds, not every tick.
FAILURE_BACKOFF_MAX = 5.0


async def after_failure(loop_name: str, exc: Exception, failures: int) -> int:
    """Log a side loop's failed round and pause; return the count of failures in a row.

    A side loop never stops ``tally serve``: an outage (``TRANSIENT``) is logged quietly, any
    other error (a statement cancelled by ``statement_timeout`` or ``pg_cancel_backend``, a
    permission, a bug in one round) with its traceback, then the loop backs off and goes on.
    """
    if isinstance(exc, TRANSIENT):
        log.debug("%s: database unavailable: %r", loop_name, exc)
        return failures
    log.error("%s: round failed; going on", loop_name, exc_info=exc)
    await asyncio.sleep(min(FAILURE_BACKOFF_MAX, 0.5 * 2**failures))
    return failures + 1


class Upkeep:
    """The reaper (leases) and the snapshot (gauges, database readiness)."""

    def __init__(
        self,
        settings: ServeSettings,
        jobs: JobStore,
        dispatcher: Dispatcher,
        metrics: Metrics,
        set_db_ok: Callable[[bool], None],
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.set_db_ok = set_db_ok

    async def reaper(self) -> None:
        """Renew the leases of live executions; expire the others (lost, offers rejected)."""
        s = self.settings
        failures = 0
        while True:
            await asyncio.sleep(s.reap_interval)
            try:
                running = [eid for d in self.dispatcher.daemons.values() for eid in d.running]
                await within(self.jobs.extend_leases(running, s.lease_timeout), 10)
                for r in await within(self.jobs.reap(), 10):
                    self.dispatcher.release(r.execution_id)
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
                failures = 0
            except Exception as exc:
                failures = await after_failure("reaper", exc, failures)

    async def cancel_sweep(self) -> None:
        """Every ``CANCEL_SWEEP_INTERVAL``, tell this orchestrator's daemons again to stop the
        executions whose job a client cancelled.

        The notification that relays a cancel can be lost (the listener reconnecting, the
        offer not yet attached, a link dying before it noticed); the flag in the database is
        not. A task of its own, beside the reaper: a daemon that stopped reading holds up
        only its own cancels (each send gives up after ``CANCEL_SEND_TIMEOUT``), never the
        lease renewals of every daemon. The daemon stops a job once, however often told.
        """
        failures = 0
        while True:
            await asyncio.sleep(CANCEL_SWEEP_INTERVAL)
            try:
                await self.resend_cancels()
                failures = 0
            except Exception as exc:
                failures = await after_failure("cancel sweep", exc, failures)

    async def resend_cancels(self) -> None:
        """One sweep: read the live executions of cancelled jobs on the local daemons, and
        send each its ``job:cancel``, all at once: they are at most the local daemons' slots,
        and each send gives up after ``CANCEL_SEND_TIMEOUT``, so a daemon that stopped reading
        delays no other daemon's cancel and the sweep by at most that long."""
        daemons = list(self.dispatcher.daemons)
        pending = await within(cancels.cancelled_on(self.jobs.pool, daemons), 10)
        held = [(eid, job_id) for eid, job_id in pending if eid in self.dispatcher.owner]
        sent = await asyncio.gather(*(self.dispatcher.cancel(eid) for eid, _ in held))
        for (eid, job_id), ok in zip(held, sent, strict=True):
            if ok:
                log.debug("cancel of job %s sent (again) for execution %s", job_id, eid)

    async def fold_rollups(self, interval: float = 60.0) -> None:
        """Fold past hours' rollup shards into one row per key (reports read fewer rows)."""
        failures = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await within(retention.fold_rollup_shards(self.jobs.pool), 60)
                failures = 0
            except Exception as exc:
                failures = await after_failure("fold_rollups", exc, failures)

    async def snapshot(self) -> None:
        """Refresh the gauges' snapshot and the database readiness every few seconds."""
        while True:
            try:
                queued = await within(self.jobs.queued_by_queue(), 2.0)
                self.set_db_ok(True)
                await self.jobs.touch_daemons(list(self.dispatcher.daemons))
            except Exception as exc:
                log.debug("snapshot: database unavailable: %r", exc)
                self.set_db_ok(False)
                queued = self.metrics.snapshot[0]
            try:
                # Never sums closed hours (the dispatcher's warm-up does), and a slow report
                # keeps the previous figures without marking the database unready.
                self.metrics.budgets = await within(self.jobs.budget_report(), 5.0)
            except Exception as exc:
                log.debug("snapshot: budget figures not refreshed: %r", exc)
            self.metrics.snapshot = (
                queued,
                len(self.dispatcher.daemons),
                self.dispatcher.slot_snapshot(),
            )
            await asyncio.sleep(self.settings.snapshot_interval)

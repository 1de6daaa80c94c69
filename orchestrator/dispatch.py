"""Dispatch: the connected daemons and watching clients of one orchestrator, offers, updates."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import msgspec

from orchestrator.config import ServeSettings
from orchestrator.metrics import Metrics
from orchestrator.sessions import ClientSession, DaemonSession
from orchestrator.store import ClaimedJob, JobStore
from orchestrator.store.claim import CLAIM_DEADLINE
from orchestrator.wire import send, send_many
from shared import protocol as p
from shared.aio import within

log = logging.getLogger(__name__)

# How long one offer may wait for a daemon's socket before it is left to time out.
OFFER_SEND_TIMEOUT = 10.0
# How often the budgets' closed hours are brought up to date when no claim asks.
WARM_INTERVAL = 60.0

# Seconds a job:cancel may wait for a daemon's link to take it (a daemon that stopped reading
# fills its socket): past this its sender moves on, and the cancel sweep sends it again.
CANCEL_SEND_TIMEOUT = 2.0


class Dispatcher:
    """Sessions, watchers and the dispatch loop of one orchestrator."""

    def __init__(self, settings: ServeSettings, jobs: JobStore, metrics: Metrics) -> None:
        self.settings = settings
        self.jobs = jobs
        self.metrics = metrics
        self.daemons: dict[str, DaemonSession] = {}
        self.watchers: dict[str, set[ClientSession]] = defaultdict(set)
        # execution id -> the session holding it: releasing a slot is O(1) per result,
        # not a scan of every connected daemon.
        self.owner: dict[str, DaemonSession] = {}
        self.wake = asyncio.Event()
        self.accepting = True
        # How long a claim may decide (then rolled back); its commit and offers are not cut.
        self.claim_deadline = CLAIM_DEADLINE

    # --- sessions ------------------------------------------------------------------------

    def add_daemon(self, session: DaemonSession) -> DaemonSession | None:
        """Register a session; return the one it supersedes, if any."""
        old = self.daemons.get(session.daemon_id)
        self.daemons[session.daemon_id] = session
        self.wake.set()
        return old

    def remove_daemon(self, session: DaemonSession) -> bool:
        """Forget a session; False if a newer session of the same daemon replaced it."""
        if self.daemons.get(session.daemon_id) is session:
            del self.daemons[session.daemon_id]
            return True
        return False

    def attach(self, session: DaemonSession, execution_id: str, job_id: str) -> None:
        """An execution now holds one of a session's slots."""
        session.executions[execution_id] = job_id
        self.owner[execution_id] = session

    def release(self, execution_id: str) -> None:
        """An execution no longer holds a slot (result recorded, rejected, lost)."""
        session = self.owner.pop(execution_id, None)
        if session is not None and session.executions.pop(execution_id, None) is not None:
            session.running.discard(execution_id)
            self.wake.set()

    async def cancel(self, execution_id: str, reason: str = "cancelled by client") -> bool:
        """Send ``job:cancel`` to the connected daemon holding an execution; False if none,
        or if the send did not finish within ``CANCEL_SEND_TIMEOUT`` (a daemon that stopped
        reading: the frame may still go out; the cancel sweep tells it again)."""
        session = self.owner.get(execution_id)
        if session is None or self.daemons.get(session.daemon_id) is not session:
            return False
        frame = p.make(p.JobCancel, p.CancelPayload(reason=reason), execution_id)
        try:
            async with asyncio.timeout(CANCEL_SEND_TIMEOUT):
                return await send(session.ws, frame)
        except TimeoutError:
            log.warning(
                "daemon %s: job:cancel for %s not written within %gs (not reading?)",
                session.daemon_id,
                execution_id,
                CANCEL_SEND_TIMEOUT,
            )
            return False

    def session_for_job(self, job_id: str) -> tuple[DaemonSession, str] | None:
        """The local daemon session running a job, with the execution id."""
        for session in self.daemons.values():
            for eid, jid in session.executions.items():
                if jid == job_id:
                    return session, eid
        return None

    def slot_snapshot(self) -> dict[str, int]:
        """Busy, free and draining slot counts for the gauge."""
        out = {"busy": 0, "free": 0, "draining": 0}
        for s in self.daemons.values():
            busy = len(s.executions)
            out["busy"] += busy
            if s.draining:
                out["draining"] += max(0, s.capacity - busy)
            else:
                out["free"] += max(0, s.capacity - busy)
        return out

    # --- watchers ------------------------------------------------------------------------

    def watch(self, client: ClientSession, job_ids: list[str]) -> None:
        """Subscribe a client to jobs' updates."""
        for job_id in job_ids:
            client.watching.add(job_id)
            self.watchers[job_id].add(client)

    def unwatch_all(self, client: ClientSession) -> None:
        """Drop a disconnected client's subscriptions."""
        for job_id in client.watching:
            subscribers = self.watchers.get(job_id)
            if subscribers is not None:
                subscribers.discard(client)
                if not subscribers:
                    del self.watchers[job_id]

    async def publish(self, job_ids: list[str]) -> None:
        """Send current status (and totals when finished) to clients watching these jobs."""
        wanted = [j for j in job_ids if j in self.watchers]
        if not wanted:
            return
        for view in await self.jobs.views(wanted):
            frame = p.make(
                p.JobUpdate,
                p.UpdatePayload(
                    job_id=view.job_id,
                    status=view.status,  # type: ignore[arg-type]
                    attempts=view.attempts,
                    totals=p.JobTotals(**view.totals) if view.totals else msgspec.UNSET,
                    output=msgspec.UNSET if view.output is None else view.output,
                    output_truncated=True if view.output_truncated else msgspec.UNSET,
                ),
            )
            for client in list(self.watchers.get(view.job_id, ())):
                await send(client.ws, frame)

    # --- dispatch ------------------------------------------------------------------------

    def _free_slots(self) -> dict[str, list[tuple[str, dict[str, frozenset[str]]]]]:
        sessions = sorted(
            (s for s in self.daemons.values() if s.free_slots > 0),
            key=lambda s: len(s.executions) / max(1, s.capacity),
        )
        slots: dict[str, list[tuple[str, dict[str, frozenset[str]]]]] = defaultdict(list)
        # Round-robin over daemons so the least loaded get the first jobs.
        rounds = max((s.free_slots for s in sessions), default=0)
        for r in range(rounds):
            for s in sessions:
                if r < s.free_slots:
                    for name in s.executors:
                        slots[name].append((s.daemon_id, s.executors))
        return slots

    async def dispatch_once(self) -> int:
        """Claim queued jobs for free local slots and send the offers; return how many, or
        -1 when the claim stopped with more candidates to look at (call again at once)."""
        if not self.accepting:
            return 0
        slots = self._free_slots()
        if not slots:
            return 0
        total_free = sum(s.free_slots for s in self.daemons.values())
        claim = await self.jobs.claim(
            slots,
            self.settings.offer_timeout,
            total_free,
            self.settings.default_max_turns or None,
            self.claim_deadline,
        )
        # Counted here, after the claim's transaction committed: exactly once. Each daemon's
        # offers go out as their own task, bounded: a daemon that stopped reading never
        # delays another's; an offer not delivered is withdrawn (its job queued again).
        for executor in claim.failed:
            self.metrics.count_job(executor, "failed")
        per_daemon: dict[str, list[ClaimedJob]] = defaultdict(list)
        for job in claim.jobs:
            per_daemon[job.daemon_id].append(job)
        await asyncio.gather(*(self._offer_all(d, jobs) for d, jobs in per_daemon.items()))
        if not claim.jobs and claim.more:
            return -1
        return len(claim.jobs)

    async def _offer_all(self, daemon_id: str, jobs: list[ClaimedJob]) -> None:
        """Send one daemon's offers in one write; withdraw those not delivered. Never raises:
        what fails is logged and withdrawn, so that no claimed job is stranded."""
        unsent = [job.execution_id for job in jobs]
        why = "offer not delivered: daemon gone"
        try:
            session = self.daemons.get(daemon_id)
            frames: list[p.AnyFrame] = []
            for job in jobs:
                self.metrics.queue_wait.observe(job.queue_wait_seconds)
            if session is not None:
                for job in jobs:
                    frame = await self._offer_frame(job)
                    if frame is None:
                        unsent.remove(job.execution_id)  # failed, not withdrawn
                        continue
                    self.attach(session, job.execution_id, job.job_id)
                    frames.append(frame)
                why = "offer not delivered: the daemon's link is closed"
                if await within(send_many(session.ws, frames), OFFER_SEND_TIMEOUT):
                    return
        except TimeoutError:
            why = f"offer not delivered: daemon not reading within {OFFER_SEND_TIMEOUT:g}s"
        except Exception:
            log.exception("offers to daemon %s", daemon_id)
            why = "offer not delivered: internal error"
        await self._withdraw(unsent, why)

    async def _withdraw(self, execution_ids: list[str], why: str) -> None:
        """Withdraw undelivered offers: slots freed, jobs queued again, nothing counted (if
        the database is down, the reaper times them out instead)."""
        if not execution_ids:
            return
        log.warning("%d offer(s) withdrawn: %s", len(execution_ids), why)
        for eid in execution_ids:
            self.release(eid)
        try:
            await within(self.jobs.withdraw(execution_ids, why), OFFER_SEND_TIMEOUT)
        except Exception as exc:
            log.warning("offers not withdrawn (they time out instead): %s", exc)
        self.wake.set()

    async def _offer_frame(self, job: ClaimedJob) -> p.AnyFrame | None:
        """The job:offer frame of a claimed job, or None if its limits cannot be offered
        (the job is failed with the cause)."""
        try:
            # The claim built these limits within the wire's bounds; never offer a job with
            # its limits dropped: if they still do not convert, the job fails with the cause.
            limits = msgspec.convert(job.limits, p.Limits)
        except msgspec.ValidationError as exc:
            error = f"cannot offer the job: limits {job.limits}: {exc}"
            log.error("job %s: %s", job.job_id, error)
            if await self.jobs.fail_offer(job.execution_id, error):
                self.metrics.count_job(job.executor, "failed")
            return None
        return p.make(
            p.JobOffer,
            p.OfferPayload(
                job_id=job.job_id,
                attempt=job.attempt,
                executor=job.executor,
                model=job.model if job.model is not None else msgspec.UNSET,
                spec=job.spec,
                limits=limits,
                labels=job.labels,
            ),
            job.execution_id,
        )

    async def run_dispatcher(self) -> None:
        """Dispatch whenever woken, beside the budgets' warm-up."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._dispatch_loop())
            tg.create_task(self._warm_budget_figures())

    async def _warm_budget_figures(self) -> None:
        """Sum the budgets' closed hours outside any claim (no deadline: a first sum over a
        long period may take a while), when a claim asks and every minute; the jobs held
        while they were loading are then decided at once."""
        closed = self.jobs.closed_spend
        while True:
            closed.wanted.clear()
            try:
                if await self.jobs.warm_closed_spend():
                    self.wake.set()
            except Exception as exc:
                log.warning("budget figures: closed hours not summed: %s", exc)
                await asyncio.sleep(1.0)
            try:
                async with asyncio.timeout(WARM_INTERVAL):
                    await closed.wanted.wait()
            except TimeoutError:
                pass

    async def _dispatch_loop(self) -> None:
        """Dispatch whenever woken (new job, free slot, new daemon) or a backoff expires."""
        while True:
            try:
                timeout = await within(self.jobs.next_available_in(), 10)
            except Exception as exc:
                log.debug("next_available_in failed: %s", exc)
                timeout = 1.0
            try:
                async with asyncio.timeout(timeout if timeout is not None else 60):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                while await self.dispatch_once():
                    pass
            except Exception as exc:
                log.warning("dispatch failed: %s", exc)
                await asyncio.sleep(1.0)
                self.wake.set()

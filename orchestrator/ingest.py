"""Ingest: the one path of a job frame from its connection to its acknowledgement.

A connection hands a validated ``job:generation``, ``job:tool`` or ``job:result`` to
:meth:`Writer.submit` and nothing else. The writer batches frames from every connection into
few transactions, persists them through the store, then, in this order: counts what the batch
newly recorded, frees the slots of finished executions, gives the senders' windows back, and
answers every frame (an ack, or the error that names it). Frames are acknowledged only after
the batch holding them committed. While PostgreSQL is unreachable the writer keeps its batch,
retries with backoff and marks the service unready; nothing is acknowledged, so daemons keep
the frames in their outboxes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection

from orchestrator import usage_events, wire
from orchestrator.accounting import BatchOutcome, Verdict, merge_counted
from orchestrator.metrics import Metrics
from orchestrator.sessions import DaemonSession
from orchestrator.store.db import classify
from orchestrator.store.ledger import Incoming, LedgerStore
from shared import protocol as p
from shared import replies
from shared.limits import fit_text

log = logging.getLogger(__name__)


def refused_result(exc: p.ProtocolError) -> p.JobResult | None:
    """The result the orchestrator records itself for an attempt whose ``job:result`` failed
    validation (None for any other refused frame): failed, error class ``invalid_result`` (not
    retried: trying again would not make the daemon's frame valid), no totals, so the
    attempt's usage stays the sum of its recorded calls.

    It goes through :meth:`Writer.submit` like any result, so it is fenced on the daemon the
    execution is assigned to, idempotent (a later result of that execution is a duplicate),
    and it decides the job, frees the slot and ends the lease as any result does.
    """
    if exc.code != "invalid_frame" or exc.frame_type != "job:result" or exc.frame_id is None:
        return None
    return p.make(
        p.JobResult,
        p.ResultPayload(
            success=False,
            error_message=fit_text(
                f"the orchestrator refused this attempt's job:result: {exc.message} (at {exc.path})"
            ),
            stop_reason="error",
            error_class="invalid_result",
        ),
        exc.frame_id,
    )


@dataclass(slots=True)
class Pending:
    """A frame waiting for durability, and the session that sent it (its link and window)."""

    incoming: Incoming
    session: DaemonSession
    received_at: float


class Writer:
    """Collects frames, persists them in batches bounded by rows and delay, then replies."""

    def __init__(
        self,
        ledgers: list[LedgerStore],
        metrics: Metrics,
        on_ready: Callable[[bool], None],
        release: Callable[[str], None],
        max_rows: int = 1000,
        max_delay: float = 0.005,
        max_backoff: float = 5.0,
    ) -> None:
        # One worker per ledger connection: while one batch is in PostgreSQL the next is
        # prepared, so the database and Python overlap. Correct with any number of workers:
        # batches lock their executions in id order and every write is idempotent.
        self.ledgers = ledgers
        self.metrics = metrics
        self.on_ready = on_ready
        self.release = release
        self.max_rows = max_rows
        self.max_delay = max_delay
        self.max_backoff = max_backoff
        # One queue per worker; a frame goes to the worker of its execution, so the frames of
        # one execution are persisted in the order they arrived (calls before their result).
        # A deque and an event each: asyncio.Queue costs a few microseconds per item in put
        # and get, paid for every frame.
        self.queues: list[deque[Pending]] = [deque() for _ in ledgers]
        self._ready = [asyncio.Event() for _ in ledgers]
        # Frames received and not yet answered; the gauge reads it at scrape time (a gauge
        # update per frame took a lock per frame).
        self.pending = 0
        metrics.writer_pending.set_function(lambda: self.pending)
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0
        # Per worker: when its current batch first failed (monotonic), None while it commits.
        self.failing_since: list[float | None] = [None for _ in ledgers]
        self.refused = 0

    def stalled_for(self) -> float:
        """Seconds the longest-failing worker has gone without committing its batch (0: none)."""
        now = time.monotonic()
        return max((now - t for t in self.failing_since if t is not None), default=0.0)

    def submit(self, pending: Pending) -> None:
        """Queue a frame for the next batch."""
        self._idle.clear()
        shard = hash(pending.incoming.frame.id.lower()) % len(self.queues)
        self.queues[shard].append(pending)
        self._ready[shard].set()
        self.pending += 1

    async def wait_idle(self) -> None:
        """Return once everything submitted so far has been persisted and answered."""
        await self._idle.wait()

    async def run(self) -> None:
        """The writer workers; run until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for shard, (ledger, queue, ready) in enumerate(
                zip(self.ledgers, self.queues, self._ready, strict=True)
            ):
                tg.create_task(self._worker(shard, ledger, queue, ready))

    async def _worker(
        self, shard: int, ledger: LedgerStore, queue: deque[Pending], ready: asyncio.Event
    ) -> None:
        while True:
            if not queue:
                if self._busy == 0 and not any(self.queues):
                    self._idle.set()
                ready.clear()
                await ready.wait()  # frames stay in the deque until taken below, never lost
                continue
            self._busy += 1
            batch: list[Pending] = []
            self._drain_into(queue, batch)
            if len(batch) < self.max_rows and self.max_delay > 0:
                # Let a burst gather into one transaction.
                await asyncio.sleep(self.max_delay)
                self._drain_into(queue, batch)
            # The final persist and its acks are shielded: a shutdown waits for them.
            try:
                await asyncio.shield(self._flush(shard, ledger, batch))
            finally:
                self._busy -= 1

    def _drain_into(self, queue: deque[Pending], batch: list[Pending]) -> None:
        take = min(self.max_rows - len(batch), len(queue))
        batch.extend(queue.popleft() for _ in range(take))

    async def _flush(self, shard: int, ledger: LedgerStore, batch: list[Pending]) -> None:
        outcome = await self._persist_with_retry(shard, ledger, batch)
        self.pending -= len(batch)
        self.metrics.record_batch(outcome)
        if outcome.events:
            usage_events.emit(outcome.events)
        for execution_id in outcome.freed_executions:
            self.release(execution_id)
        # The answers for one link go out in order and in one write: a slow link delays only
        # its own acks, and a batch of thousands of acks costs a handful of system calls.
        by_link: dict[ServerConnection, list[p.AnyFrame]] = {}
        for pending, verdict in zip(batch, outcome.verdicts, strict=True):
            pending.session.unacked.release()
            answer = self._answer(pending.incoming.frame, verdict)
            by_link.setdefault(pending.session.ws, []).append(answer)
        await asyncio.gather(*(wire.send_many(link, frames) for link, frames in by_link.items()))

    def _answer(
        self, frame: p.JobGeneration | p.JobTool | p.JobResult, verdict: Verdict
    ) -> p.AnyFrame:
        """The frame that answers a verdict, counted."""
        if verdict == "refused":
            self.metrics.frames_rejected.labels("refused_by_database").inc()
            return replies.refused(frame)
        if verdict == "not_assigned":
            self.metrics.frames_rejected.labels("not_assigned").inc()
            seq = None if isinstance(frame, p.JobResult) else frame.payload.seq
            return replies.not_assigned(frame.id, p.frame_type(frame), seq)
        if verdict == "duplicate":
            self.metrics.results_duplicate.inc()
        return replies.ack(frame)

    async def _persist_with_retry(
        self, shard: int, ledger: LedgerStore, batch: list[Pending]
    ) -> BatchOutcome:
        """Persist a batch; split it on an error of the data until the bad frames are alone.

        Only the frame that causes a data error is refused (answered so that its daemon drops
        it); the rest of its batch is recorded. Outages and server errors are retried with
        backoff, never refused: the frames wait, unacknowledged, in the daemons' outboxes.
        """
        backoff = 0.05
        items = [pending.incoming for pending in batch]
        while True:
            started = time.perf_counter()
            try:
                outcome = await ledger.persist(items)
            except Exception as exc:
                kind = classify(exc)
                if kind == "data":
                    self.failing_since[shard] = None
                    if len(batch) > 1:
                        return await self._split(shard, ledger, batch)
                    frame = batch[0].incoming.frame
                    log.error(
                        "%s %s from daemon %s refused by the database: %s: %s",
                        p.frame_type(frame),
                        frame.id,
                        batch[0].incoming.daemon_id,
                        type(exc).__name__,
                        exc,
                    )
                    self.refused += 1
                    # A refused result will never be recorded: its slot is freed so the
                    # execution's lease runs out and the job is re-queued, not held forever.
                    freed = [frame.id.lower()] if isinstance(frame, p.JobResult) else []
                    return BatchOutcome(verdicts=["refused"], freed_executions=freed)
                if self.failing_since[shard] is None:
                    self.failing_since[shard] = time.monotonic()
                self.metrics.persist_failures.inc()
                if kind == "transient":
                    self.on_ready(False)
                log_at = log.warning if kind == "transient" else log.error
                log_at(
                    "persist of %d frames failed (%s: %s); retrying in %.2fs",
                    len(batch),
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            self.failing_since[shard] = None
            self.on_ready(True)
            self.metrics.persist_batch_seconds.observe(time.perf_counter() - started)
            self.metrics.persist_batch_rows.observe(len(batch))
            return outcome

    async def _split(self, shard: int, ledger: LedgerStore, batch: list[Pending]) -> BatchOutcome:
        """Persist two halves on their own: log2(n) rounds isolate each refused frame.

        The halves keep the arrival order, so an execution's calls still precede its result.
        """
        half = len(batch) // 2
        merged = BatchOutcome(verdicts=[])
        for part in (batch[:half], batch[half:]):
            one = await self._persist_with_retry(shard, ledger, part)
            merged.verdicts.extend(one.verdicts)
            merge_counted(merged.counted, one.counted)
            merged.new_calls.extend(one.new_calls)
            merged.finished_jobs.extend(one.finished_jobs)
            merged.inconsistent += one.inconsistent
            merged.freed_executions.extend(one.freed_executions)
            merged.new_tools.extend(one.new_tools)
            merged.events.extend(one.events)
        return merged

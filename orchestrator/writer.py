"""The ledger writer: batches validated job frames from every connection into few transactions.

Frames are acknowledged only after the batch holding them committed. While PostgreSQL is
unreachable the writer keeps its batch, retries with backoff and marks the service unready;
nothing is acknowledged, so daemons keep the frames in their outboxes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from websockets.asyncio.server import ServerConnection

from orchestrator.hub import send_many
from orchestrator.metrics import Metrics
from orchestrator.store.ledger import BatchOutcome, Incoming, LedgerStore, merge_counted
from shared import protocol as p

log = logging.getLogger("tally.writer")

DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,
    asyncpg.InternalClientError,
)


@dataclass(slots=True)
class Pending:
    """A frame waiting for durability, its sender's link, and the frame answering a verdict."""

    incoming: Incoming
    link: ServerConnection
    reply: Callable[[str], p.AnyFrame]
    received_at: float


class Writer:
    """Collects frames, persists them in batches bounded by rows and delay, then replies."""

    def __init__(
        self,
        ledgers: list[LedgerStore],
        metrics: Metrics,
        on_ready: Callable[[bool], None],
        on_committed: Callable[[BatchOutcome], None],
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
        self.on_committed = on_committed
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
            for ledger, queue, ready in zip(self.ledgers, self.queues, self._ready, strict=True):
                tg.create_task(self._worker(ledger, queue, ready))

    async def _worker(
        self, ledger: LedgerStore, queue: deque[Pending], ready: asyncio.Event
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
                await asyncio.shield(self._flush(ledger, batch))
            finally:
                self._busy -= 1

    def _drain_into(self, queue: deque[Pending], batch: list[Pending]) -> None:
        take = min(self.max_rows - len(batch), len(queue))
        batch.extend(queue.popleft() for _ in range(take))

    async def _flush(self, ledger: LedgerStore, batch: list[Pending]) -> None:
        outcome = await self._persist_with_retry(ledger, batch)
        self.pending -= len(batch)
        self.on_committed(outcome)
        # The answers for one link go out in order and in one write: a slow link delays only
        # its own acks, and a batch of thousands of acks costs a handful of system calls.
        by_link: dict[ServerConnection, list[p.AnyFrame]] = {}
        for pending, verdict in zip(batch, outcome.verdicts, strict=True):
            by_link.setdefault(pending.link, []).append(pending.reply(verdict))
        await asyncio.gather(*(send_many(link, frames) for link, frames in by_link.items()))

    async def _persist_with_retry(self, ledger: LedgerStore, batch: list[Pending]) -> BatchOutcome:
        backoff = 0.05
        items = [pending.incoming for pending in batch]
        while True:
            started = time.perf_counter()
            try:
                outcome = await ledger.persist(items)
            except DATA_ERRORS as exc:
                if len(items) > 1:
                    # One bad frame must not block the others: persist them one by one.
                    return await self._persist_each(ledger, batch)
                log.error("frame refused by the database: %s: %s", type(exc).__name__, exc)
                return BatchOutcome(verdicts=["refused"])
            except (*TRANSIENT, asyncpg.PostgresError) as exc:
                self.metrics.persist_failures.inc()
                self.on_ready(False)
                log.warning(
                    "persist failed (%s: %s); retrying in %.2fs", type(exc).__name__, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            self.on_ready(True)
            self.metrics.persist_batch_seconds.observe(time.perf_counter() - started)
            self.metrics.persist_batch_rows.observe(len(batch))
            return outcome

    async def _persist_each(self, ledger: LedgerStore, batch: list[Pending]) -> BatchOutcome:
        """Persist frames one at a time, isolating those the database refuses."""
        merged = BatchOutcome(verdicts=[])
        for pending in batch:
            one = await self._persist_with_retry(ledger, [pending])
            merged.verdicts.extend(one.verdicts)
            merge_counted(merged.counted, one.counted)
            merged.new_calls.extend(one.new_calls)
            merged.finished_jobs.extend(one.finished_jobs)
            merged.inconsistent += one.inconsistent
            merged.freed_executions.extend(one.freed_executions)
        return merged

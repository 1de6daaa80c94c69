"""The ledger writer: batches validated job frames from every connection into few transactions.

Frames are acknowledged only after the batch holding them committed. While PostgreSQL is
unreachable the writer keeps its batch, retries with backoff and marks the service unready;
nothing is acknowledged, so daemons keep the frames in their outboxes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from orchestrator.metrics import Metrics
from orchestrator.store.ledger import BatchOutcome, Incoming, LedgerStore

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
    """A frame waiting for durability, and how to tell its sender the verdict."""

    incoming: Incoming
    reply: Callable[[str], Awaitable[None]]
    received_at: float


class Writer:
    """Collects frames, persists them in batches bounded by rows and delay, then replies."""

    def __init__(
        self,
        ledger: LedgerStore,
        metrics: Metrics,
        on_ready: Callable[[bool], None],
        on_committed: Callable[[BatchOutcome], None],
        max_rows: int = 1000,
        max_delay: float = 0.005,
        max_backoff: float = 5.0,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.on_ready = on_ready
        self.on_committed = on_committed
        self.max_rows = max_rows
        self.max_delay = max_delay
        self.max_backoff = max_backoff
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, pending: Pending) -> None:
        """Queue a frame for the next batch."""
        self._idle.clear()
        self.queue.put_nowait(pending)
        self.metrics.writer_pending.inc()

    async def wait_idle(self) -> None:
        """Return once everything submitted so far has been persisted and answered."""
        await self._idle.wait()

    async def run(self) -> None:
        """The writer loop; runs until cancelled."""
        while True:
            if self.queue.empty():
                self._idle.set()
            first = await self.queue.get()
            batch = [first]
            self._drain_into(batch)
            if len(batch) < self.max_rows and self.max_delay > 0:
                # Let a burst gather into one transaction; never time out a get() (an item
                # taken by a get() that is then cancelled would be lost).
                await asyncio.sleep(self.max_delay)
                self._drain_into(batch)
            # The final persist and its acks are shielded: a shutdown waits for them.
            await asyncio.shield(self._flush(batch))

    def _drain_into(self, batch: list[Pending]) -> None:
        while len(batch) < self.max_rows and not self.queue.empty():
            batch.append(self.queue.get_nowait())

    async def _flush(self, batch: list[Pending]) -> None:
        outcome = await self._persist_with_retry(batch)
        self.metrics.writer_pending.dec(len(batch))
        self.on_committed(outcome)
        replies = [
            pending.reply(verdict) for pending, verdict in zip(batch, outcome.verdicts, strict=True)
        ]
        await asyncio.gather(*replies, return_exceptions=True)

    async def _persist_with_retry(self, batch: list[Pending]) -> BatchOutcome:
        backoff = 0.05
        items = [pending.incoming for pending in batch]
        while True:
            started = time.perf_counter()
            try:
                outcome = await self.ledger.persist(items)
            except DATA_ERRORS as exc:
                if len(items) > 1:
                    # One bad frame must not block the others: persist them one by one.
                    return await self._persist_each(batch)
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

    async def _persist_each(self, batch: list[Pending]) -> BatchOutcome:
        """Persist frames one at a time, isolating those the database refuses."""
        merged = BatchOutcome(verdicts=[])
        for pending in batch:
            one = await self._persist_with_retry([pending])
            merged.verdicts.extend(one.verdicts)
            merged.counted.extend(one.counted)
            merged.new_calls.extend(one.new_calls)
            merged.finished_jobs.extend(one.finished_jobs)
            merged.inconsistent += one.inconsistent
            merged.freed_executions.extend(one.freed_executions)
        return merged

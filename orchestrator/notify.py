"""Announcements between orchestrators: LISTEN for job changes, publish updates to watchers.

Job changes are announced by PostgreSQL (``tally_jobs``, one line per job: ``<id> <status>
<cancel|->``), so a client connected to one orchestrator hears about jobs running anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from orchestrator.dispatch import Dispatcher
from orchestrator.store.db import TRANSIENT, connect
from shared.aio import within
from shared.errors import StoreError

log = logging.getLogger(__name__)


class Notifier:
    """Listens for job changes and sends ``job:update`` to the clients watching them."""

    def __init__(self, database_url: str, dispatcher: Dispatcher) -> None:
        self.database_url = database_url
        self.dispatcher = dispatcher
        self._pending_publish: set[str] = set()
        self._publish_wake = asyncio.Event()
        self._sends: set[asyncio.Task[bool]] = set()  # kept until done (the loop holds weakly)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        # One line per changed job: "<job id> <status> <cancel|->" (older schemas appended
        # the queue; it is ignored).
        for line in payload.split("\n"):
            parts = line.split(" ", 3)
            if len(parts) < 3:
                continue
            job_id, status, cancel = parts[0], parts[1], parts[2]
            if status == "queued":
                self.dispatcher.wake.set()
            if cancel == "cancel" and status == "running":
                self._cancel_locally(job_id)
            if job_id in self.dispatcher.watchers:
                self._pending_publish.add(job_id)
                self._publish_wake.set()

    def _cancel_locally(self, job_id: str) -> None:
        # The fast path only: a notification lost (listener reconnecting), or one that comes
        # before the offer is attached or while the daemon's link is down, is made good by the
        # resend at registration, by the accept, and by the cancel sweep. Each send gives up
        # after CANCEL_SEND_TIMEOUT: a daemon that stopped reading holds no task for long.
        local = self.dispatcher.session_for_job(job_id)
        if local is not None:
            task = asyncio.get_running_loop().create_task(self.dispatcher.cancel(local[1]))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def listen(self) -> None:
        """Hold a LISTEN connection; reconnect after database outages."""
        backoff = 0.2
        while True:
            try:
                conn = await connect(self.database_url)
            except StoreError as exc:
                log.debug("listen connect failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = 0.2
            closed = asyncio.Event()
            conn.add_termination_listener(lambda _c, ev=closed: ev.set())
            try:
                await conn.add_listener("tally_jobs", self._on_notify)
                self.dispatcher.wake.set()  # notifications may have been missed meanwhile
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await within(closed.wait(), 5.0)
                    if not closed.is_set():
                        try:
                            await conn.execute("SELECT 1")
                        except TRANSIENT:
                            break
            except TRANSIENT as exc:
                log.debug("listen connection lost: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)

    async def publisher(self) -> None:
        """Send the current status of changed jobs to their watchers, a batch at a time."""
        while True:
            await self._publish_wake.wait()
            self._publish_wake.clear()
            batch, self._pending_publish = list(self._pending_publish), set()
            try:
                await self.dispatcher.publish(batch)
            except TRANSIENT as exc:
                log.debug("publish failed: %s", exc)

"""The in-memory state of one connected peer: a daemon's slots and window, a client's watches."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection


class Window:
    """Room for at most ``size`` unanswered frames; one reader waits for room.

    ``asyncio.Semaphore.acquire`` scans its waiters on every call, a measurable cost when
    taken once per frame; a counter and an event do the same for a single waiting reader.
    """

    def __init__(self, size: int) -> None:
        self.free = size
        self._room = asyncio.Event()

    async def acquire(self) -> None:
        """Take one place, waiting while none is free."""
        while self.free <= 0:
            self._room.clear()
            await self._room.wait()
        self.free -= 1

    def release(self) -> None:
        """Give one place back."""
        self.free += 1
        self._room.set()


@dataclass(eq=False)
class DaemonSession:
    """A registered daemon connection."""

    daemon_id: str
    ws: ServerConnection
    executors: dict[str, frozenset[str]]
    capacity: int
    unacked: Window
    token: str | None = None  # the token it authenticated with (None: insecure mode)
    draining: bool = False
    last_pong: float = field(default_factory=time.monotonic)
    active_jobs_reported: int = 0
    # execution id -> job id, for offered and running executions
    executions: dict[str, str] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    @property
    def free_slots(self) -> int:
        """Slots the dispatcher may fill."""
        if self.draining:
            return 0
        return max(0, self.capacity - len(self.executions))


@dataclass(eq=False)
class ClientSession:
    """A client connection and the jobs it watches."""

    ws: ServerConnection
    watching: set[str] = field(default_factory=set)

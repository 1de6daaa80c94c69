"""A minimal protocol-speaking daemon for orchestrator tests: every step is explicit."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from orchestrator.bench.loadgen import register_frame
from shared import protocol as p
from tests.stack import DAEMON_TOKEN


class RawDaemon:
    """Registers, then lets the test read frames and answer them by hand."""

    def __init__(
        self,
        url: str,
        daemon_id: str,
        executors: list[str] | None = None,
        capacity: int = 2,
        token: str = DAEMON_TOKEN,
    ) -> None:
        self.url, self.daemon_id, self.token = url, daemon_id, token
        self.executors = executors or ["simulated"]
        self.capacity = capacity
        self.ws: ClientConnection | None = None
        self.registered: p.DaemonRegistered | None = None
        self.backlog: list[p.ServerFrame] = []

    async def connect(self, inflight: list[tuple[str, str]] | None = None) -> p.DaemonRegistered:
        """Open the link and register, listing ``(execution, job)`` pairs still held."""
        self.ws = await connect(
            self.url, additional_headers={"Authorization": f"Bearer {self.token}"}
        )
        await self.ws.send(register_frame(self.daemon_id, self.executors, self.capacity, inflight))
        frame = await self.recv()
        assert isinstance(frame, p.DaemonRegistered), frame
        self.registered = frame
        return frame

    async def send(self, frame: Any) -> None:
        """Send one frame."""
        assert self.ws is not None
        await self.ws.send(p.encode(frame).decode())

    async def recv(self, timeout: float = 10) -> p.ServerFrame:
        """The next frame from the orchestrator."""
        assert self.ws is not None
        return p.decode_server_frame(await asyncio.wait_for(self.ws.recv(), timeout))

    async def next_of(self, cls: type, timeout: float = 10, pong: bool = True) -> Any:
        """Skip (and answer) pings until a frame of ``cls`` arrives."""
        for i, kept in enumerate(self.backlog):
            if isinstance(kept, cls):
                return self.backlog.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - loop.time()))
            if isinstance(frame, cls):
                return frame
            if isinstance(frame, p.HeartbeatPing):
                if pong:
                    await self.send(
                        p.HeartbeatPong(
                            id=frame.id, timestamp=p.now_ms(), payload=p.PongPayload(active_jobs=0)
                        )
                    )
            else:
                self.backlog.append(frame)  # kept for a later next_of

    async def pong_for(self, seconds: float) -> None:
        """Stay alive for a while: answer pings, ignore everything else."""
        try:
            await self.next_of(type(None), timeout=seconds)
        except TimeoutError:
            pass

    async def accept(self, offer: p.JobOffer) -> None:
        """Accept an offer."""
        await self.send(p.JobAccept(id=offer.id, timestamp=p.now_ms(), payload=p.EmptyPayload()))

    async def finish(self, offer: p.JobOffer, tokens: int = 10) -> p.JobAck:
        """Report one call and a result, and wait for the result's ack."""
        await self.send(
            p.JobGeneration(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.GenerationPayload(
                    seq=0,
                    provider="simulated",
                    response_model="sim-small",
                    input_tokens=tokens,
                    output_tokens=tokens,
                ),
            )
        )
        await self.send(
            p.JobResult(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.ResultPayload(success=True, input_tokens=tokens, output_tokens=tokens),
            )
        )
        while True:
            ack = await self.next_of(p.JobAck)
            if ack.payload.of == "job:result":
                return ack  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Close the link."""
        if self.ws is not None:
            await self.ws.close()

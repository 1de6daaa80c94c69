"""Batched writes: a batch of frames reaches the peer in order, as separate messages."""

from __future__ import annotations

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from orchestrator import wire
from shared import protocol as p


def test_websockets_still_offers_what_batched_writes_use() -> None:
    """The connection internals send_many uses exist in the installed websockets; if an
    upgrade removes them the orchestrator falls back to a send per frame, and this fails."""
    assert wire.BATCHED_WRITES
    assert hasattr(ServerConnection, "send_context")


async def test_send_many_delivers_every_frame_in_order() -> None:
    """Five hundred acks sent as one batch arrive as five hundred messages, in order."""
    frames = [
        p.make(p.JobAck, p.AckPayload(of="job:generation", seq=i), p.new_id()) for i in range(500)
    ]

    async def handler(ws: ServerConnection) -> None:
        assert await wire.send_many(ws, frames)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as client:
            got = [p.decode_server_frame(await client.recv()) for _ in range(500)]
    assert [f.payload.seq for f in got] == list(range(500))  # type: ignore[union-attr]

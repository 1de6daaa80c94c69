"""Writing to peers: a frame, or a batch of frames in one write.

The frames themselves are built in ``shared`` (``protocol.make``, ``replies``).
"""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection

from shared import protocol as p


async def send(ws: ServerConnection, frame: p.AnyFrame) -> bool:
    """Send a frame; False when the connection is already gone."""
    try:
        await ws.send(p.encode(frame).decode())
    except Exception:
        return False
    return True


# websockets has no public call that writes several messages at once. ``ws.send`` writes
# each message on its own: a system call per ack, thousands per batch under load. So a batch
# is framed by the connection's Sans-I/O protocol (``ws.protocol``, documented) and handed to
# the transport in one write, inside ``send_context`` (not documented: it is what ``send``
# itself uses to serialise writers and to raise ConnectionClosed). When an upgrade of
# websockets removes any of these, the frames go out one ``send`` at a time instead, and
# tests/test_wire.py fails so that the loss is seen.
BATCHED_WRITES = hasattr(ServerConnection, "send_context")  # protocol, transport: per instance


async def send_many(ws: ServerConnection, frames: list[p.AnyFrame]) -> bool:
    """Send frames in order in one socket write; False when the connection is already gone."""
    texts = [p.encode(frame) for frame in frames]
    try:
        if not BATCHED_WRITES:
            for text in texts:
                await ws.send(text.decode())
            return True
        async with ws.send_context():
            for text in texts:
                ws.protocol.send_text(text)
            ws.transport.write(b"".join(ws.protocol.data_to_send()))
    except Exception:
        return False
    return True

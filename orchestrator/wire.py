"""Writing to peers: a frame, a batch of frames in one write, and the replies the service sends.

Every frame the orchestrator builds for a peer is built here, from the protocol's types.
"""

from __future__ import annotations

import msgspec
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


def error_frame(
    code: str,
    message: str,
    path: str | None = None,
    ref: str | None = None,
    of: str | None = None,
    seq: int | None = None,
) -> p.Error:
    """An ``error`` frame reusing the id of the frame that caused it.

    ``of`` (and ``seq`` for a call) name the job frame answered, so that a daemon drops a
    frame that will never be accepted from its outbox, as it does on an ack.
    """
    return p.make(
        p.Error,
        p.ErrorPayload(
            code=code,
            message=message,
            path=path or msgspec.UNSET,
            of=of if of is not None else msgspec.UNSET,  # type: ignore[arg-type]
            seq=seq if seq is not None else msgspec.UNSET,
        ),
        ref or p.new_id(),
    )


def not_assigned(execution_id: str, what: str, seq: int | None = None) -> p.Error:
    """The answer to a job frame for an execution that is not (or no longer) this daemon's."""
    return error_frame(
        "not_assigned",
        f"{what}: execution {execution_id} is not assigned to this daemon or no longer open",
        "$.id",
        execution_id,
        of=what,
        seq=seq,
    )


def refused(frame: p.JobGeneration | p.JobResult) -> p.Error:
    """The answer to a job frame whose values the ledger cannot hold (never recorded)."""
    return error_frame(
        "refused_by_database",
        "the ledger cannot hold this frame's values (see the orchestrator's log); "
        "it was not recorded and will not be",
        "$.payload",
        frame.id,
        of=p.frame_type(frame),
        seq=frame.payload.seq if isinstance(frame, p.JobGeneration) else None,
    )


def ack(frame: p.JobGeneration | p.JobResult) -> p.JobAck:
    """The acknowledgement that a job frame is durable."""
    if isinstance(frame, p.JobResult):
        payload = p.AckPayload(of="job:result")
    else:
        payload = p.AckPayload(of="job:generation", seq=frame.payload.seq)
    return p.make(p.JobAck, payload, frame.id)

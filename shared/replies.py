"""The orchestrator's replies to a peer's frame, built once: ack, errors that name the frame.

Part of the one vocabulary in ``shared``: every frame is built with :func:`shared.protocol.make`.
"""

from __future__ import annotations

import msgspec

from shared import protocol as p


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


def refused(frame: p.JobGeneration | p.JobTool | p.JobResult) -> p.Error:
    """The answer to a job frame whose values the ledger cannot hold (never recorded)."""
    return error_frame(
        "refused_by_database",
        "the ledger cannot hold this frame's values (see the orchestrator's log); "
        "it was not recorded and will not be",
        "$.payload",
        frame.id,
        of=p.frame_type(frame),
        seq=None if isinstance(frame, p.JobResult) else frame.payload.seq,
    )


def ack(frame: p.JobGeneration | p.JobTool | p.JobResult) -> p.JobAck:
    """The acknowledgement that a job frame is durable."""
    if isinstance(frame, p.JobResult):
        payload = p.AckPayload(of="job:result")
    elif isinstance(frame, p.JobTool):
        payload = p.AckPayload(of="job:tool", seq=frame.payload.seq)
    else:
        payload = p.AckPayload(of="job:generation", seq=frame.payload.seq)
    return p.make(p.JobAck, payload, frame.id)

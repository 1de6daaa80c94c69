"""The orchestrator's replies to a peer's frame, built once: ack, errors that name the frame.

Part of the one vocabulary in ``shared``: every frame is built with :func:`shared.protocol.make`.
"""

from __future__ import annotations

from typing import Any

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


JOB_FRAMES = frozenset({"job:result", "job:generation", "job:tool", "job:accept", "job:reject"})


class _SeqOf(msgspec.Struct):
    seq: Any = None


class _FrameSeq(msgspec.Struct):
    payload: _SeqOf | None = None


def _seq_of(data: bytes | str) -> int | None:
    """A refused frame's ``payload.seq`` when it can be read and is a valid seq, else None."""
    try:
        seq = msgspec.json.decode(data, type=_FrameSeq).payload
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    value = seq.seq if seq is not None else None
    return value if type(value) is int and 0 <= value <= 2**31 - 1 else None


def invalid(exc: p.ProtocolError, data: bytes | str | None = None) -> p.Error:
    """The answer to a frame that failed to decode: its code, message and path, and, for a job
    frame whose id could be read, which frame it was (``of``, and ``seq`` for a call or a tool
    call), so that the daemon can settle that frame in its outbox."""
    of = exc.frame_type if exc.frame_type in JOB_FRAMES and exc.frame_id is not None else None
    seq = _seq_of(data) if data is not None and of in ("job:generation", "job:tool") else None
    return error_frame(exc.code, exc.message, exc.path, exc.frame_id, of=of, seq=seq)


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

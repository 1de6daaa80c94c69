"""Every ``tally/1`` frame as a msgspec Struct, one tagged union per direction.

Part of the wire module :mod:`shared.protocol`, which re-exports every name here.
"""

from __future__ import annotations

from msgspec import Struct

from shared.limits import Timestamp
from shared.payloads import *  # noqa: F403
from shared.payloads import (
    AckPayload,
    CancelPayload,
    ClientCancelPayload,
    DrainingPayload,
    EmptyPayload,
    ErrorPayload,
    GenerationPayload,
    OfferPayload,
    PongPayload,
    RegisteredPayload,
    RegisterPayload,
    RejectPayload,
    ResultPayload,
    StatusPayload,
    SubmitPayload,
    SubmittedPayload,
    ToolPayload,
    UpdatePayload,
    WatchPayload,
)


class _Frame(Struct, tag_field="type", frozen=True, kw_only=True):
    """The envelope shared by every frame; ``id`` is the correlation (execution) id.

    ``id`` is checked against :data:`UUID_PATTERN` by the ``decode_*`` functions after msgspec
    has built the frame: one compiled-regex match there costs about a third of what msgspec's
    own ``Meta(pattern=...)`` check costs per frame, which is a quarter of a frame's decode.
    """

    id: str
    timestamp: Timestamp


# --- frames ---------------------------------------------------------------------------------


class DaemonRegister(_Frame, tag="daemon:register", frozen=True):
    payload: RegisterPayload


class DaemonRegistered(_Frame, tag="daemon:registered", frozen=True):
    payload: RegisteredPayload


class HeartbeatPing(_Frame, tag="heartbeat:ping", frozen=True):
    payload: EmptyPayload


class HeartbeatPong(_Frame, tag="heartbeat:pong", frozen=True):
    payload: PongPayload


class JobOffer(_Frame, tag="job:offer", frozen=True):
    payload: OfferPayload


class JobAccept(_Frame, tag="job:accept", frozen=True):
    payload: EmptyPayload


class JobReject(_Frame, tag="job:reject", frozen=True):
    payload: RejectPayload


class JobStatus(_Frame, tag="job:status", frozen=True):
    payload: StatusPayload


class JobGeneration(_Frame, tag="job:generation", frozen=True):
    payload: GenerationPayload


class JobResult(_Frame, tag="job:result", frozen=True):
    payload: ResultPayload


class JobTool(_Frame, tag="job:tool", frozen=True):
    payload: ToolPayload


class JobAck(_Frame, tag="job:ack", frozen=True):
    payload: AckPayload


class JobCancel(_Frame, tag="job:cancel", frozen=True):
    payload: CancelPayload


class DaemonDraining(_Frame, tag="daemon:draining", frozen=True):
    payload: DrainingPayload


class JobSubmit(_Frame, tag="job:submit", frozen=True):
    payload: SubmitPayload


class JobSubmitted(_Frame, tag="job:submitted", frozen=True):
    payload: SubmittedPayload


class JobWatch(_Frame, tag="job:watch", frozen=True):
    payload: WatchPayload


class ClientCancel(_Frame, tag="job:cancel", frozen=True):
    payload: ClientCancelPayload


class JobUpdate(_Frame, tag="job:update", frozen=True):
    payload: UpdatePayload


class Error(_Frame, tag="error", frozen=True):
    payload: ErrorPayload


DaemonFrame = (
    DaemonRegister
    | HeartbeatPong
    | JobAccept
    | JobReject
    | JobStatus
    | JobGeneration
    | JobResult
    | JobTool
    | DaemonDraining
)
ServerFrame = (
    DaemonRegistered
    | HeartbeatPing
    | JobOffer
    | JobAck
    | JobCancel
    | JobSubmitted
    | JobUpdate
    | Error
)
ClientFrame = JobSubmit | JobWatch | ClientCancel
AnyFrame = DaemonFrame | ServerFrame | ClientFrame

DAEMON_TYPES = frozenset(t.__struct_config__.tag for t in DaemonFrame.__args__)
SERVER_TYPES = frozenset(t.__struct_config__.tag for t in ServerFrame.__args__)
CLIENT_TYPES = frozenset(t.__struct_config__.tag for t in ClientFrame.__args__)
ALL_TYPES = DAEMON_TYPES | SERVER_TYPES | CLIENT_TYPES

__all__ = [
    "ALL_TYPES",
    "CLIENT_TYPES",
    "DAEMON_TYPES",
    "SERVER_TYPES",
    "AnyFrame",
    "ClientCancel",
    "ClientFrame",
    "DaemonDraining",
    "DaemonFrame",
    "DaemonRegister",
    "DaemonRegistered",
    "Error",
    "HeartbeatPing",
    "HeartbeatPong",
    "JobAccept",
    "JobAck",
    "JobCancel",
    "JobGeneration",
    "JobOffer",
    "JobReject",
    "JobResult",
    "JobStatus",
    "JobSubmit",
    "JobSubmitted",
    "JobTool",
    "JobUpdate",
    "JobWatch",
    "ServerFrame",
]

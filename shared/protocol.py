"""The ``tally/1`` wire protocol: every frame as a msgspec Struct, one tagged union per direction.

A frame is one JSON text message ``{"type", "id", "timestamp", "payload"}``. Field names are
camelCase on the wire, optional fields are omitted (``null`` is rejected), unknown keys are
ignored, numbers are never coerced from strings.

Every value is bounded by what the ledger and the metrics can hold, and refused at decode with
its JSON path rather than by the database later (see ``docs/protocol.md``, "Limits"):

- token counters are integers ``0 ..= 2**53 - 1``, the largest a Prometheus counter (a float64)
  and a JavaScript sender hold exactly; a running sum past ``BIGINT`` is refused by the ledger
  for that one frame;
- money ``0 ..= 1e9`` USD per field, durations and timestamps finite, turns ``<= 1,000,000``;
- every string that reaches an index or a metric label (model, provider, finish reason,
  executor, queue, label keys and values, ids) has a length limit, and the lists and maps
  that carry them a size limit;
- JSON nesting deeper than :data:`MAX_DEPTH` is refused before parsing.
"""

from __future__ import annotations

import operator
import re
import time
import uuid
from enum import IntEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

__all__ = ["UNSET"]  # re-exported for callers building optional fields

PROTOCOL_VERSION = "1.0"
PROTOCOL_MAJOR = 1

UUID_PATTERN = (
    r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-8][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
    r"|00000000-0000-0000-0000-000000000000|[fF]{8}-[fF]{4}-[fF]{4}-[fF]{4}-[fF]{12})$"
)
MAX_COUNTER = 2**53 - 1
MAX_MONEY = 1e9
MAX_MILLIS = 1e12  # about 31 years
MAX_TIMESTAMP = 1e15  # epoch ms, year 33658
MAX_TURNS = 1_000_000
MAX_NAME = 256  # model, provider, executor, queue, finish reason, label key or value
MAX_TEXT = 65_536  # free text (error messages), stored but never indexed
MAX_LABELS = 64
MAX_DEPTH = 64

Uuid = Annotated[str, Meta(pattern=UUID_PATTERN)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNTER)]
Money = Annotated[float, Meta(ge=0, le=MAX_MONEY)]
Millis = Annotated[float, Meta(ge=0, le=MAX_MILLIS)]
Timestamp = Annotated[float, Meta(ge=0, le=MAX_TIMESTAMP)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
NonEmpty = Name
ShortText = Annotated[str, Meta(max_length=MAX_NAME)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Turns = Annotated[int, Meta(ge=0, le=MAX_TURNS)]
Seq = Annotated[int, Meta(ge=0, le=2**31 - 1)]
PositiveInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Labels = Annotated[dict[Name, ShortText], Meta(max_length=MAX_LABELS)]

CostSource = Literal[
    "provider", "sdk_estimate", "price_table", "price_override", "unpriced", "local"
]
StopReason = Literal[
    "end_turn",
    "max_turns",
    "max_output_tokens",
    "max_total_tokens",
    "budget",
    "timeout",
    "cancelled",
    "error",
    "unpriced",
]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_JOB_STATES: frozenset[JobState] = frozenset({"succeeded", "failed", "cancelled"})


class CloseCode(IntEnum):
    """WebSocket close codes of ``tally/1``."""

    GRACEFUL = 1000
    GOING_AWAY = 1001  # orchestrator shutting down, or an idle client
    POLICY = 1008  # bad JSON, unauthorised frame, a daemon id not allowed for the token
    TOO_LARGE = 1009
    HEARTBEAT = 4001  # no frame within the heartbeat timeout
    SUPERSEDED = 4002  # a newer connection of the same daemon
    PROTOCOL = 4003  # incompatible protocol version


class _Payload(Struct, rename="camel", omit_defaults=True, frozen=True, kw_only=True):
    """Base of every payload: camelCase keys, defaults omitted on encode."""


class _Frame(Struct, tag_field="type", frozen=True, kw_only=True):
    """The envelope shared by every frame; ``id`` is the correlation (execution) id.

    ``id`` is checked against :data:`UUID_PATTERN` by the ``decode_*`` functions after msgspec
    has built the frame: one compiled-regex match there costs about a third of what msgspec's
    own ``Meta(pattern=...)`` check costs per frame, which is a quarter of a frame's decode.
    """

    id: str
    timestamp: Timestamp


# --- payload parts --------------------------------------------------------------------------


class EmptyPayload(_Payload, frozen=True):
    """A payload with no fields (``{}``)."""


class ExecutorInfo(_Payload, frozen=True):
    """One executor a daemon offers, and the models it restricts itself to (empty: any)."""

    name: NonEmpty
    models: Annotated[list[NonEmpty], Meta(max_length=1000)] = []


class InflightExecution(_Payload, frozen=True):
    """An execution a daemon still holds when it (re)registers."""

    execution_id: Uuid
    job_id: Uuid
    state: Literal["running", "finishing"] = "running"


class Limits(_Payload, frozen=True):
    """What a job may spend; a job stops before or as soon as one would be passed."""

    max_turns: PositiveInt | UnsetType = UNSET
    max_output_tokens: Count | UnsetType = UNSET
    max_total_tokens: Count | UnsetType = UNSET
    budget_usd: Money | UnsetType = UNSET
    timeout_ms: PositiveInt | UnsetType = UNSET


# The fields of a modelUsage entry its sender may declare it did not know.
EntryField = Literal[
    "inputTokens",
    "outputTokens",
    "cacheReadInputTokens",
    "cacheCreationInputTokens",
    "reasoningTokens",
    "costUsd",
]


class ModelUsage(_Payload, frozen=True):
    """Per-model usage inside a ``job:result``; the reference requires all six core fields.

    ``unreported`` (a Tally extension; the reference ignores unknown keys) names the fields
    whose value the sender did not know: they carry 0 on the wire only because the reference
    requires them, and the orchestrator treats them as unknown, never as a known zero.
    """

    model: NonEmpty
    input_tokens: Count
    output_tokens: Count
    cache_read_input_tokens: Count
    cache_creation_input_tokens: Count
    cost_usd: Money
    provider: NonEmpty | UnsetType = UNSET
    reasoning_tokens: Count | UnsetType = UNSET
    unreported: Annotated[list[EntryField], Meta(max_length=6)] | UnsetType = UNSET


class JobSpec(_Payload, frozen=True):
    """One job as a client submits it."""

    executor: NonEmpty
    model: NonEmpty | UnsetType = UNSET
    spec: dict[str, Any] = {}
    limits: Limits = Limits()
    labels: Labels = {}
    queue: NonEmpty = "default"
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    priority: Annotated[int, Meta(ge=-1000, le=1000)] = 0
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=200)] | UnsetType = UNSET


class JobTotals(_Payload, frozen=True):
    """A finished job's ledger totals, as ``job:update`` reports them."""

    input_tokens: Count | UnsetType = UNSET
    output_tokens: Count | UnsetType = UNSET
    cache_read_input_tokens: Count | UnsetType = UNSET
    cache_creation_input_tokens: Count | UnsetType = UNSET
    reasoning_tokens: Count | UnsetType = UNSET
    cost_usd: Money | UnsetType = UNSET
    num_turns: Count | UnsetType = UNSET
    stop_reason: str | UnsetType = UNSET
    error_message: str | UnsetType = UNSET
    # Calls without a price: costUsd (when present) is then a lower bound.
    unpriced_calls: Count | UnsetType = UNSET
    cache_creation_1h_input_tokens: Count | UnsetType = msgspec.field(
        default=UNSET, name="cacheCreation1hInputTokens"
    )


# --- payloads -------------------------------------------------------------------------------


class RegisterPayload(_Payload, frozen=True):
    """``daemon:register``."""

    daemon_id: Annotated[str, Meta(min_length=1, max_length=200)]
    hostname: ShortText
    version: ShortText
    protocol_version: NonEmpty
    executors: Annotated[list[ExecutorInfo], Meta(max_length=100)]
    max_concurrent_jobs: Annotated[int, Meta(ge=0, le=100_000)]
    labels: Labels = {}
    inflight: Annotated[list[InflightExecution], Meta(max_length=100_000)] = []


class RegisteredPayload(_Payload, frozen=True):
    """``daemon:registered``."""

    heartbeat_interval_ms: PositiveInt
    offer_timeout_ms: PositiveInt
    lease_timeout_ms: PositiveInt
    resumed: list[Uuid] = []


class PongPayload(_Payload, frozen=True):
    """``heartbeat:pong``."""

    active_jobs: Count
    resources: dict[str, float] = {}


class OfferPayload(_Payload, frozen=True):
    """``job:offer``: the executor input and its limits."""

    job_id: Uuid
    attempt: PositiveInt
    executor: NonEmpty
    model: NonEmpty | UnsetType = UNSET
    spec: dict[str, Any] = {}
    limits: Limits = Limits()
    labels: dict[str, str] = {}


class RejectPayload(_Payload, frozen=True):
    """``job:reject``: ``busy``, ``unsupported``, ``shutting-down`` or free text."""

    reason: NonEmpty
    message: Text | UnsetType = UNSET


class StatusPayload(_Payload, frozen=True):
    """``job:status``."""

    status: Literal["running"]
    message: str | UnsetType = UNSET


class GenerationPayload(_Payload, frozen=True):
    """``job:generation``: one LLM call, in Tally's usage convention."""

    seq: Seq
    provider: NonEmpty
    request_model: NonEmpty | UnsetType = UNSET
    response_model: NonEmpty | UnsetType = UNSET
    finish_reason: NonEmpty | UnsetType = UNSET
    input_tokens: Count | UnsetType = UNSET
    output_tokens: Count | UnsetType = UNSET
    cache_read_input_tokens: Count | UnsetType = UNSET
    cache_creation_input_tokens: Count | UnsetType = UNSET
    reasoning_tokens: Count | UnsetType = UNSET
    tokens_unavailable: bool | UnsetType = UNSET
    cost_usd: Money | UnsetType = UNSET
    cost_source: CostSource | UnsetType = UNSET
    duration_ms: Millis | UnsetType = UNSET
    request_id: ShortText | UnsetType = UNSET
    # The 1-hour part of cacheCreationInputTokens (a subset, priced at its own rate).
    cache_creation_1h_input_tokens: Count | UnsetType = msgspec.field(
        default=UNSET, name="cacheCreation1hInputTokens"
    )


class ResultPayload(_Payload, frozen=True):
    """``job:result``: wire-compatible with the reference 1.x, plus Tally's additions."""

    success: bool
    delivery_id: ShortText | UnsetType = UNSET
    cost_usd: Money | UnsetType = UNSET
    duration_ms: Millis | UnsetType = UNSET
    num_turns: Turns | UnsetType = UNSET
    input_tokens: Count | UnsetType = UNSET
    output_tokens: Count | UnsetType = UNSET
    cache_read_input_tokens: Count | UnsetType = UNSET
    cache_creation_input_tokens: Count | UnsetType = UNSET
    model_usage: Annotated[list[ModelUsage], Meta(max_length=1000)] | UnsetType = UNSET
    error_message: Text | UnsetType = UNSET
    reasoning_tokens: Count | UnsetType = UNSET
    tokens_unavailable: bool | UnsetType = UNSET
    cost_source: CostSource | UnsetType = UNSET
    stop_reason: StopReason | UnsetType = UNSET
    # The 1-hour part of cacheCreationInputTokens (a subset, priced at its own rate).
    cache_creation_1h_input_tokens: Count | UnsetType = msgspec.field(
        default=UNSET, name="cacheCreation1hInputTokens"
    )


class AckPayload(_Payload, frozen=True):
    """``job:ack``: what was made durable."""

    of: Literal["job:result", "job:generation"]
    seq: Seq | UnsetType = UNSET


class CancelPayload(_Payload, frozen=True):
    """``job:cancel`` sent to the daemon running an execution."""

    reason: str = "cancelled"


class DrainingPayload(_Payload, frozen=True):
    """``daemon:draining``."""

    active_jobs: Count
    reason: ShortText = "shutdown"


class SubmitPayload(_Payload, frozen=True):
    """``job:submit``."""

    jobs: Annotated[list[JobSpec], Meta(min_length=1, max_length=10_000)]


class SubmittedPayload(_Payload, frozen=True):
    """``job:submitted``: one id per submitted job, in order (an existing id for a repeat)."""

    job_ids: list[Uuid]


class WatchPayload(_Payload, frozen=True):
    """``job:watch``."""

    job_ids: Annotated[list[Uuid], Meta(min_length=1, max_length=10_000)]


class ClientCancelPayload(_Payload, frozen=True):
    """``job:cancel`` from a client: cancel a job wherever it is."""

    job_id: Uuid
    reason: ShortText = "cancelled by client"


class UpdatePayload(_Payload, frozen=True):
    """``job:update``: a status change and, when the job is done, its totals."""

    job_id: Uuid
    status: JobState
    attempts: Count = 0
    totals: JobTotals | UnsetType = UNSET


class ErrorPayload(_Payload, frozen=True):
    """``error``: a stable code, a message and the JSON path of the fault."""

    code: NonEmpty
    message: str
    path: str | UnsetType = UNSET
    # Tally extensions: which job frame the error answers, so a daemon can drop a frame the
    # orchestrator will never accept from its outbox (as an ack would).
    of: Literal["job:result", "job:generation", "job:accept", "job:reject"] | UnsetType = UNSET
    seq: Seq | UnsetType = UNSET


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


class ProtocolError(Exception):
    """A frame failed to decode or validate.

    Attributes:
        code: stable machine-readable cause (``invalid_json``, ``invalid_frame``,
            ``unknown_type``, ``wrong_direction``).
        path: JSON path of the fault, ``$`` for the whole frame.
        frame_type: the frame's ``type`` when it could be read, else None.
        frame_id: the frame's ``id`` when it could be read, else None.
    """

    def __init__(
        self,
        code: str,
        message: str,
        path: str = "$",
        frame_type: str | None = None,
        frame_id: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message} (at {path})")
        self.code = code
        self.message = message
        self.path = path
        self.frame_type = frame_type
        self.frame_id = frame_id


class _Peek(Struct):
    """Just enough of an envelope to explain a failure."""

    type: Any = None
    id: Any = None


_is_uuid = re.compile(UUID_PATTERN).match
_model_of = operator.attrgetter("model")
_UUID_EXPECTED = "Expected `str` holding a UUID (RFC 9562: version 1-8, variant 8-b)"
_daemon_decoder = msgspec.json.Decoder(DaemonFrame)
_server_decoder = msgspec.json.Decoder(ServerFrame)
_client_decoder = msgspec.json.Decoder(ClientFrame)
_peek_decoder = msgspec.json.Decoder(_Peek)
_encoder = msgspec.json.Encoder()

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def _explain(exc: Exception, data: bytes | str, own: frozenset[str]) -> ProtocolError:
    """Turn a msgspec failure into a ProtocolError with code and JSON path."""
    if not isinstance(exc, msgspec.ValidationError):
        return ProtocolError("invalid_json", f"frame is not valid JSON: {exc}")
    try:
        peek = _peek_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        peek = _Peek()
    ftype = peek.type if isinstance(peek.type, str) else None
    fid = peek.id if isinstance(peek.id, str) and _is_uuid(peek.id) else None
    text = str(exc)
    match = _AT.match(text)
    message = match.group("msg") if match else text
    path = (match.group("path") if match else None) or "$"
    if UUID_PATTERN in message:
        message = message.replace(
            f"matching regex '{UUID_PATTERN}'",
            "holding a UUID (RFC 9562: version 1-8, variant 8-b)",
        )
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}"
    if path == "$.type" and ftype is not None and ftype not in own:
        if ftype in ALL_TYPES:
            return ProtocolError(
                "wrong_direction",
                f"frame type {ftype!r} is not accepted in this direction",
                path,
                ftype,
                fid,
            )
        return ProtocolError("unknown_type", f"unknown frame type {ftype!r}", path, ftype, fid)
    return ProtocolError("invalid_frame", message, path, ftype, fid)


def _bad_id(frame: AnyFrame) -> ProtocolError:
    """The error for a frame whose envelope ``id`` is not a UUID."""
    return ProtocolError("invalid_frame", _UUID_EXPECTED, "$.id", frame_type(frame))


def _depth_of(data: bytes | str) -> int:
    """The deepest nesting of arrays and objects in a JSON text, strings skipped."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def check_depth(data: bytes | str, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before any parser recurses into it.

    A frame with fewer opening brackets than the limit cannot be deeper, which two C-speed
    counts establish for nearly every frame; only the rare frame with many brackets is
    scanned character by character.
    """
    if isinstance(data, bytes):
        openers = data.count(b"[") + data.count(b"{")
    else:
        openers = data.count("[") + data.count("{")
    if openers > limit and _depth_of(data) > limit:
        raise ProtocolError("invalid_frame", f"JSON nested deeper than {limit} levels")


def decode_daemon_frame(data: bytes | str) -> DaemonFrame:
    """Decode and validate a frame a daemon sent to the orchestrator.

    Every daemon frame is fully typed (nothing of it nests beyond a few levels or is stored
    as free JSON), so its nesting is bounded by the parser itself: JSON nested past the
    interpreter's recursion limit is refused as ``invalid_frame``, at no cost to the frames
    that are not (a pre-parse scan costs about 2 us per result frame, a third of its decode).
    Client frames carry free JSON (a job's ``spec``) and are checked before parsing.
    """
    try:
        frame: DaemonFrame = _daemon_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _explain(exc, data, DAEMON_TYPES) from None
    except RecursionError:
        raise ProtocolError("invalid_frame", "JSON nested too deeply") from None
    if _is_uuid(frame.id) is None:
        raise _bad_id(frame)
    if type(frame) is JobResult:
        entries = frame.payload.model_usage
        if entries and len(entries) > 1 and _repeats_a_model(entries):
            raise _repeated_model(frame, entries)
    return frame


def _repeats_a_model(entries: list[ModelUsage]) -> bool:
    """Whether two entries name one model; two or three entries (the common case) are compared
    directly, which costs half of building a set, on every result decoded."""
    n = len(entries)
    if n == 2:
        return entries[0].model == entries[1].model
    if n == 3:
        a, b, c = entries[0].model, entries[1].model, entries[2].model
        return a == b or a == c or b == c
    return len(set(map(_model_of, entries))) < n


def _repeated_model(frame: JobResult, entries: list[ModelUsage]) -> ProtocolError:
    """Two ``modelUsage`` entries for one model could not be told apart in the ledger."""
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.model in seen:
            return ProtocolError(
                "invalid_frame",
                f"model {entry.model!r} repeats an earlier modelUsage entry (one per model)",
                f"$.payload.modelUsage[{i}].model",
                "job:result",
                frame.id,
            )
        seen.add(entry.model)
    raise AssertionError("called without a repeated model")


def decode_server_frame(data: bytes | str) -> ServerFrame:
    """Decode and validate a frame the orchestrator sent to a daemon or a client."""
    check_depth(data)
    try:
        frame: ServerFrame = _server_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _explain(exc, data, SERVER_TYPES) from None
    if _is_uuid(frame.id) is None:
        raise _bad_id(frame)
    return frame


def decode_client_frame(data: bytes | str) -> ClientFrame:
    """Decode and validate a frame a client sent to the orchestrator."""
    check_depth(data)
    try:
        frame: ClientFrame = _client_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _explain(exc, data, CLIENT_TYPES) from None
    if _is_uuid(frame.id) is None:
        raise _bad_id(frame)
    return frame


def peek_type(data: bytes | str) -> str | None:
    """Return a frame's ``type`` without validating the rest, or None when unreadable."""
    try:
        check_depth(data)
        peek = _peek_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, ProtocolError):
        return None
    return peek.type if isinstance(peek.type, str) else None


def encode(frame: AnyFrame) -> bytes:
    """Encode a frame to its JSON wire form."""
    return _encoder.encode(frame)


def new_id() -> str:
    """A fresh random (version 4) frame or execution id."""
    return str(uuid.uuid4())


def now_ms() -> float:
    """The current time as epoch milliseconds, the wire's timestamp unit."""
    return time.time() * 1000.0


def frame_type(frame: AnyFrame) -> str:
    """The wire ``type`` of a frame object."""
    return str(type(frame).__struct_config__.tag)


def protocol_major(version: str) -> int | None:
    """The major number of a ``MAJOR.MINOR`` protocol version string, or None if unreadable."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def encode_json(value: object) -> str:
    """Any msgspec-encodable value as JSON text (for jsonb columns)."""
    return _encoder.encode(value).decode()


_S = Any


def without_nul(value: _S) -> _S:
    """A struct or plain value with every U+0000 in its strings (keys too) replaced by U+FFFD.

    PostgreSQL ``text`` and ``jsonb`` cannot hold U+0000, and refusing a whole registration,
    submission or result for one character would lose what it carries. Values without the
    character are returned as they are, after one scan of their encoded form.
    """
    doc = _encoder.encode(value)
    if b"\\u0000" not in doc:
        return value
    plain = scrub_nul(msgspec.json.decode(doc))
    return msgspec.convert(plain, type(value)) if isinstance(value, Struct) else plain


def scrub_nul(value: Any) -> Any:
    """A plain JSON value with U+0000 in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [scrub_nul(v) for v in value]
    if isinstance(value, dict):
        return {scrub_nul(k): scrub_nul(v) for k, v in value.items()}
    return value

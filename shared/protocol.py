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
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, Struct

from shared import frames, limits, payloads

# The wire's types live in shared.frames and shared.limits; this module re-exports them all,
# so ``from shared import protocol as p`` reaches every frame, limit and codec function.
from shared.frames import *  # noqa: F403
from shared.frames import (
    ALL_TYPES,
    CLIENT_TYPES,
    DAEMON_TYPES,
    SERVER_TYPES,
    AnyFrame,
    ClientFrame,
    DaemonFrame,
    JobResult,
    ServerFrame,
)
from shared.limits import *  # noqa: F403
from shared.limits import MAX_DEPTH, UUID_PATTERN
from shared.output import depth as output_depth
from shared.payloads import *  # noqa: F403
from shared.payloads import ModelUsage

# The nesting a job's output may have: a job:update frame carrying it stays within MAX_DEPTH.
OUTPUT_DEPTH = MAX_DEPTH - 8

__all__ = [
    "UNSET",  # re-exported for callers building optional fields
    "ProtocolError",
    "check_depth",
    "decode_client_frame",
    "decode_daemon_frame",
    "decode_server_frame",
    "encode",
    "encode_json",
    "frame_type",
    "make",
    "new_id",
    "now_ms",
    "peek_type",
    "protocol_major",
    "scrub_nul",
    "without_nul",
]
__all__ += frames.__all__
__all__ += limits.__all__
__all__ += payloads.__all__


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

    Every daemon frame but a result's ``output`` is fully typed, and that one is checked
    after the decode, so a frame's nesting is bounded by the parser itself: JSON nested past the
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
        answer = frame.payload.output
        if type(answer) is dict and output_depth(answer) > OUTPUT_DEPTH:
            # Free JSON the ledger stores and job:update relays to clients, whose decoders
            # refuse frames nested past MAX_DEPTH.
            raise ProtocolError(
                "invalid_frame",
                f"output nests deeper than {OUTPUT_DEPTH} levels",
                "$.payload.output",
                "job:result",
                frame.id,
            )
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


_F = TypeVar("_F", bound=AnyFrame)


def make(cls: type[_F], payload: Any, ref: str | None = None) -> _F:
    """A frame of ``cls`` stamped now; ``ref`` is its correlation id (the execution, or the
    frame it answers), a fresh id when None. Every frame is built through here."""
    return cls(id=ref or new_id(), timestamp=now_ms(), payload=payload)


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

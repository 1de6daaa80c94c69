"""The limits and vocabulary of ``tally/1``: bounded value types, literals, close codes.

Part of the wire module :mod:`shared.protocol`, which re-exports every name here.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Literal

from msgspec import Meta

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
# A job's answer on the wire: at most 1 MiB of text (the daemon cuts it at its own, smaller
# --max-output-bytes, 256 KiB by default, and the orchestrator again at its own on storage).
MAX_OUTPUT_CHARS = 1_048_576
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

# How an attempt's failure is classified by the daemon: retryable (provider overload, rate
# limit, server error, timeout, connection) re-queues the job with a backoff while attempts
# remain; permanent (authentication, invalid request, limits, cancel) fails it at once.
ErrorClass = Literal["retryable", "permanent"]
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


__all__ = [
    "MAX_COUNTER",
    "MAX_DEPTH",
    "MAX_LABELS",
    "MAX_MILLIS",
    "MAX_MONEY",
    "MAX_NAME",
    "MAX_OUTPUT_CHARS",
    "MAX_TEXT",
    "MAX_TIMESTAMP",
    "MAX_TURNS",
    "PROTOCOL_MAJOR",
    "PROTOCOL_VERSION",
    "TERMINAL_JOB_STATES",
    "UUID_PATTERN",
    "CloseCode",
    "CostSource",
    "Count",
    "ErrorClass",
    "JobState",
    "Labels",
    "Millis",
    "Money",
    "Name",
    "NonEmpty",
    "PositiveInt",
    "Seq",
    "ShortText",
    "StopReason",
    "Text",
    "Timestamp",
    "Turns",
    "Uuid",
]

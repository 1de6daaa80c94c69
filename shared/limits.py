"""The limits and vocabulary of ``tally/1``: bounded value types, literals, close codes.

Part of the wire module :mod:`shared.protocol`, which re-exports every name here.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Annotated, Any, Literal

import msgspec
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
# The smallest frame limit an orchestrator may set (``tally serve --max-frame-bytes``): every
# job frame a daemon builds can be fitted under it (a result with its answer cut still carries
# up to 64 KiB of error text and its per-call names).
MIN_FRAME_BYTES = 131_072
# The longest wait a provider's retry-after is honoured for before another attempt, by the
# daemon (daemon/failures.py) and by the orchestrator's re-queue (ledger_sql.DECIDE_JOBS).
MAX_RETRY_AFTER_MS = 600_000.0

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
# invalid_result: the orchestrator refused the attempt's job:result (it failed validation)
# and ended the attempt itself; not a provider fault, so it fails the job like permanent.
ErrorClass = Literal["retryable", "permanent", "invalid_result"]
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


_json = msgspec.json.Encoder()


def valid_text(text: str) -> str:
    """The text with U+0000 (PostgreSQL text cannot hold it; the orchestrator stores it so)
    and lone surrogates (a JSON ``\\ud800`` decodes to one; no encoder takes it) as U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def fit_text(value: Any, max_chars: int = MAX_TEXT) -> str:
    """Free text (an error message) that any ``tally/1`` decoder accepts as :data:`Text`.

    Measured as it travels: its JSON-encoded size is at most ``max_chars`` bytes, which bounds
    the characters the orchestrator's decoder counts (each takes at least one byte) and the
    frame's size (a control character takes six). Longer text is cut (never inside a
    character) and marked ``… [cut: N bytes]``, N the UTF-8 bytes left out. Never raises.
    """
    try:
        text = valid_text(value if isinstance(value, str) else str(value))
    except Exception:  # a hostile __str__
        text = f"<{type(value).__name__} that cannot be shown>"
    size = len(_json.encode(text)) - 2
    if size <= max_chars:
        return text
    total = len(text.encode("utf-8"))
    keep = max_chars - 40  # room for the marker
    cut = text.encode("utf-8")[: max(0, keep)].decode("utf-8", "ignore")
    while cut and len(_json.encode(cut)) - 2 > keep:
        cut = cut[: max(0, len(cut) * keep // (len(_json.encode(cut)) - 2) - 1)]
    return f"{cut}… [cut: {total - len(cut.encode('utf-8'))} bytes]"


def fit_name(value: Any) -> str | None:
    """A name (model, provider, finish reason, request id) any decoder accepts as
    :data:`Name`: U+0000 and lone surrogates replaced, cut to :data:`MAX_NAME` characters
    (the last one an ellipsis, marking the cut); None for a non-string or an empty one (the
    field is then omitted). Never raises."""
    if not isinstance(value, str) or not value:
        return None
    text = valid_text(value)
    if len(text) > MAX_NAME:
        text = text[: MAX_NAME - 1] + "…"
    return text


def fit_number(value: Any, upper: float) -> float | None:
    """A finite number within ``0 ..= upper`` as a float, else None (unknown). Never raises."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past a float's range
        return None
    return number if math.isfinite(number) and 0 <= number <= upper else None


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
    "MAX_RETRY_AFTER_MS",
    "MAX_TEXT",
    "MAX_TIMESTAMP",
    "MAX_TURNS",
    "MIN_FRAME_BYTES",
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
    "fit_name",
    "fit_number",
    "fit_text",
    "valid_text",
]

"""The payload of every ``tally/1`` frame, and the parts payloads share.

Part of the wire module :mod:`shared.protocol`, which re-exports every name here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from shared.limits import (
    MAX_OUTPUT_CHARS,
    CostSource,
    Count,
    ErrorClass,
    JobState,
    Labels,
    Millis,
    Money,
    NonEmpty,
    PositiveInt,
    Seq,
    ShortText,
    StopReason,
    Text,
    Timestamp,
    Turns,
    Uuid,
)


class _Payload(Struct, rename="camel", omit_defaults=True, frozen=True, kw_only=True):
    """Base of every payload: camelCase keys, defaults omitted on encode."""


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
    # Delayed start: the job is not offered before this long after the orchestrator
    # accepted it (relative, so no clock of a client is trusted).
    delay_ms: Millis | UnsetType = UNSET


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
    # The largest frame this orchestrator accepts (its --max-frame-bytes): the daemon fits
    # every job frame under it. Absent (an older orchestrator): the daemon's own bound.
    max_frame_bytes: PositiveInt | UnsetType = UNSET


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
    # When the call started (epoch ms, the daemon's clock); it ended durationMs later.
    started_at: Timestamp | UnsetType = UNSET
    # The 1-hour part of cacheCreationInputTokens (a subset, priced at its own rate).
    cache_creation_1h_input_tokens: Count | UnsetType = msgspec.field(
        default=UNSET, name="cacheCreation1hInputTokens"
    )
    # The provider's usage contradicted itself (more cached than prompt tokens, a count that is
    # not a count): the buckets that could not be trusted are omitted (unknown), the rest kept.
    usage_inconsistent: bool | UnsetType = UNSET


class ToolPayload(_Payload, frozen=True):
    """``job:tool`` (a Tally extension): one tool call an agent loop answered.

    Only its shape travels, never the raw arguments or result: the tool's name, when it
    started, how long it ran, the sizes of its arguments and result, and whether it failed.
    ``seq`` numbers an execution's tool calls; ``afterCall`` is the ``seq`` of the
    ``job:generation`` whose response asked for it.
    """

    seq: Seq
    name: NonEmpty
    started_at: Timestamp
    duration_ms: Millis
    after_call: Seq | UnsetType = UNSET
    arguments_bytes: Count = 0
    result_bytes: Count = 0
    error: bool = False


# What an agent answered: its final text, or the JSON object a spec with ``outputSchema`` asked
# for. The daemon cuts it at its --max-output-bytes and says so (``outputTruncated``).
Output = Annotated[str, Meta(max_length=MAX_OUTPUT_CHARS)] | dict[str, Any]


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
    # A failed attempt: whether another attempt may succeed, and how long the provider asked
    # to wait before one (its retry-after).
    error_class: ErrorClass | UnsetType = UNSET
    retry_after_ms: Millis | UnsetType = UNSET
    # What the agent answered (a Tally extension), and whether it was cut to fit.
    output: Output | UnsetType = UNSET
    output_truncated: bool | UnsetType = UNSET


class AckPayload(_Payload, frozen=True):
    """``job:ack``: what was made durable."""

    of: Literal["job:result", "job:generation", "job:tool"]
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
    # Accept jobs for an executor no registered daemon has offered (one that will come later).
    allow_unknown_executor: bool = False


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
    # A finished job's answer (see ResultPayload.output).
    output: Output | UnsetType = UNSET
    output_truncated: bool | UnsetType = UNSET


class ErrorPayload(_Payload, frozen=True):
    """``error``: a stable code, a message and the JSON path of the fault."""

    code: NonEmpty
    message: str
    path: str | UnsetType = UNSET
    # Tally extensions: which job frame the error answers, so a daemon can drop a frame the
    # orchestrator will never accept from its outbox (as an ack would).
    of: (
        Literal["job:result", "job:generation", "job:tool", "job:accept", "job:reject"] | UnsetType
    ) = UNSET
    seq: Seq | UnsetType = UNSET


__all__ = [
    "AckPayload",
    "CancelPayload",
    "ClientCancelPayload",
    "DrainingPayload",
    "EmptyPayload",
    "EntryField",
    "ErrorPayload",
    "ExecutorInfo",
    "GenerationPayload",
    "InflightExecution",
    "JobSpec",
    "JobTotals",
    "Limits",
    "ModelUsage",
    "OfferPayload",
    "Output",
    "PongPayload",
    "RegisterPayload",
    "RegisteredPayload",
    "RejectPayload",
    "ResultPayload",
    "StatusPayload",
    "SubmitPayload",
    "SubmittedPayload",
    "ToolPayload",
    "UpdatePayload",
    "WatchPayload",
]

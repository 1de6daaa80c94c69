"""The spans of an exported attempt: ``invoke_agent`` for the attempt and one child per LLM
call, with the GenAI semantic conventions' attributes taken from the ledger's columns.

Ids are derived from the ledger's identity, so a span sent again (after a crash, or after a
late result) is the same span to any backend: the trace id is the job's UUID, an attempt's
span id comes from its execution id and a call's from its execution id and ``seq``.
A bucket the ledger holds as unknown is absent, never 0.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from orchestrator.export.queue import Attempt, Call
from orchestrator.metrics import genai_operation
from shared.usage import Usage

SCOPE = InstrumentationScope("tally.ledger", "1")

# Tally's provider names as the conventions' gen_ai.provider.name values.
PROVIDERS = {"google": "gcp.gemini", "gemini": "gcp.gemini"}

# An attempt that ended in one of these has error status (a rejected one is exported only
# for its late usage: an offer that timed out but ran anyway).
ERRORS = ("failed", "lost", "rejected")


def provider_name(provider: str) -> str:
    """``gen_ai.provider.name`` of a ledger provider."""
    return PROVIDERS.get(provider, provider)


def trace_id(job_id: str) -> int:
    """A job's trace: its UUID's 128 bits."""
    return uuid.UUID(job_id).int


def span_id(*parts: object) -> int:
    """A stable 64-bit span id from an identity (never 0, which OTLP reserves)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def nanos(at: datetime) -> int:
    """Epoch nanoseconds of a timestamp."""
    return int(at.timestamp() * 1_000_000) * 1000


def usage_attributes(usage: Usage) -> dict[str, int]:
    """The token attributes a span carries: only the known ones."""
    values = {
        # Every input token, cached ones included (the conventions' meaning).
        "gen_ai.usage.input_tokens": usage.total_input,
        "gen_ai.usage.output_tokens": usage.output,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation,
        "gen_ai.usage.reasoning.output_tokens": usage.reasoning,
    }
    return {key: value for key, value in values.items() if value is not None}


def cost_attributes(cost: Any, source: str | None) -> dict[str, Any]:
    """The cost and where it came from; an unpriced cost is absent, never 0."""
    out: dict[str, Any] = {}
    if cost is not None:
        out["tally.cost.usd"] = float(cost)
    if source is not None:
        out["tally.cost.source"] = source
    return out


def label_attributes(labels: dict[str, str], prefix: str) -> dict[str, str]:
    """The job's labels as attributes under ``prefix``."""
    return {f"{prefix}{key}": str(value) for key, value in labels.items()}


def call_window(call: Call) -> tuple[datetime, datetime]:
    """When a call started and ended: from the daemon's start and duration, else ending when
    the ledger recorded it."""
    duration = timedelta(milliseconds=call.duration_ms or 0.0)
    if call.started_at is not None:
        return call.started_at, call.started_at + duration
    return call.recorded_at - duration, call.recorded_at


def attempt_window(attempt: Attempt) -> tuple[datetime, datetime]:
    """When an attempt started (or was offered) and ended; it spans its calls."""
    start = attempt.started_at or attempt.offered_at
    end = attempt.finished_at or start
    for call in attempt.calls:
        first, last = call_window(call)
        start, end = min(start, first), max(end, last)
    return start, end


def call_attributes(attempt: Attempt, call: Call, label_prefix: str) -> dict[str, Any]:
    """A call span's attributes."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": genai_operation(call.provider),
        "gen_ai.provider.name": provider_name(call.provider),
        **usage_attributes(call.usage),
        **cost_attributes(call.cost_usd, call.cost_source),
        "tally.job.id": attempt.job_id,
        "tally.execution.id": attempt.id,
        "tally.call.seq": call.seq,
        **label_attributes(attempt.labels, label_prefix),
    }
    for key, value in (
        ("gen_ai.request.model", call.request_model),
        ("gen_ai.response.model", call.response_model),
        ("gen_ai.response.id", call.request_id),
    ):
        if value is not None:
            attrs[key] = value
    if call.finish_reason is not None:
        attrs["gen_ai.response.finish_reasons"] = [call.finish_reason]
    return attrs


def attempt_attributes(attempt: Attempt, label_prefix: str) -> dict[str, Any]:
    """An attempt span's attributes: the attempt's totals as the ledger holds them."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": attempt.executor,
        **usage_attributes(attempt.usage),
        **cost_attributes(attempt.cost_usd, attempt.cost_source),
        "tally.job.id": attempt.job_id,
        "tally.execution.id": attempt.id,
        "tally.attempt": attempt.attempt,
        "tally.daemon.id": attempt.daemon_id,
        "tally.status": attempt.status,
        **label_attributes(attempt.labels, label_prefix),
    }
    if attempt.model is not None:
        attrs["gen_ai.request.model"] = attempt.model
    if attempt.stop_reason is not None:
        attrs["tally.stop_reason"] = attempt.stop_reason
    if attempt.num_turns is not None:
        attrs["tally.num_turns"] = attempt.num_turns
    return attrs


def attempt_spans(attempt: Attempt, resource: Resource, label_prefix: str) -> list[ReadableSpan]:
    """The attempt's ``invoke_agent`` span and one ``chat`` (or ``generate_content``) child
    span per recorded call."""
    trace = trace_id(attempt.job_id)
    root = SpanContext(trace, span_id(attempt.id), False, TraceFlags(TraceFlags.SAMPLED))
    start, end = attempt_window(attempt)
    status = (
        Status(StatusCode.ERROR, attempt.error or attempt.status)
        if attempt.status in ERRORS
        else Status(StatusCode.UNSET)
    )
    spans = [
        ReadableSpan(
            name=f"invoke_agent {attempt.executor}",
            context=root,
            resource=resource,
            attributes=attempt_attributes(attempt, label_prefix),
            kind=SpanKind.INTERNAL,
            status=status,
            start_time=nanos(start),
            end_time=nanos(end),
            instrumentation_scope=SCOPE,
        )
    ]
    for call in attempt.calls:
        first, last = call_window(call)
        model = call.request_model or call.response_model or ""
        spans.append(
            ReadableSpan(
                name=f"{genai_operation(call.provider)} {model}".strip(),
                context=SpanContext(
                    trace, span_id(attempt.id, call.seq), False, TraceFlags(TraceFlags.SAMPLED)
                ),
                parent=root,
                resource=resource,
                attributes=call_attributes(attempt, call, label_prefix),
                kind=SpanKind.CLIENT,
                start_time=nanos(first),
                end_time=nanos(last),
                instrumentation_scope=SCOPE,
            )
        )
    return spans

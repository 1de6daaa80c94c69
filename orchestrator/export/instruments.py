"""The OTLP metrics of exported calls: the GenAI conventions' ``gen_ai.client.token.usage``
and ``gen_ai.client.operation.duration``, and Tally's cost, call and token counters.

A call is recorded once: when its attempt is exported for the first time, or, for a call
recorded after that export (a late one), when the attempt is exported again.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider

from orchestrator.export.queue import Attempt, Call
from orchestrator.export.spans import provider_name
from orchestrator.metrics import GENAI_DURATION_BUCKETS, GENAI_TOKEN_BUCKETS, genai_operation

BUCKETS = (
    ("input", "input"),
    ("output", "output"),
    ("cache_read", "cache_read"),
    ("cache_creation", "cache_creation"),
    ("reasoning", "reasoning"),
)


class Instruments:
    """The instruments on one meter provider."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("tally.ledger", "1")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens per LLM call: input (cached included) and output.",
            explicit_bucket_boundaries_advisory=[float(b) for b in GENAI_TOKEN_BUCKETS],
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of LLM calls.",
            explicit_bucket_boundaries_advisory=list(GENAI_DURATION_BUCKETS),
        )
        self.tokens = meter.create_counter(
            "tally.tokens",
            unit="{token}",
            description="Tokens recorded in the ledger, by bucket (tally.token.bucket).",
        )
        self.cost = meter.create_counter(
            "tally.cost", unit="USD", description="Cost of the priced calls recorded."
        )
        self.calls = meter.create_counter(
            "tally.llm_calls", unit="{call}", description="LLM calls recorded."
        )

    def record(self, attempt: Attempt) -> int:
        """Record the attempt's calls not recorded by an earlier export; return how many."""
        fresh = [
            call
            for call in attempt.calls
            if attempt.exported_at is None or call.recorded_at > attempt.exported_at
        ]
        for call in fresh:
            self._record_call(call)
        return len(fresh)

    def _record_call(self, call: Call) -> None:
        base: dict[str, Any] = {
            "gen_ai.operation.name": genai_operation(call.provider),
            "gen_ai.provider.name": provider_name(call.provider),
        }
        if call.request_model is not None:
            base["gen_ai.request.model"] = call.request_model
        if call.response_model is not None:
            base["gen_ai.response.model"] = call.response_model
        total_input = call.usage.total_input
        if total_input is not None:
            self.token_usage.record(total_input, {**base, "gen_ai.token.type": "input"})
        if call.usage.output is not None:
            self.token_usage.record(call.usage.output, {**base, "gen_ai.token.type": "output"})
        if call.duration_ms is not None:
            self.duration.record(call.duration_ms / 1000, base)
        for field, bucket in BUCKETS:
            value = getattr(call.usage, field)
            if value is not None:
                self.tokens.add(value, {**base, "tally.token.bucket": bucket})
        if call.cost_usd is not None:
            source = {"tally.cost.source": call.cost_source or "unknown"}
            self.cost.add(float(call.cost_usd), {**base, **source})
        self.calls.add(1, base)

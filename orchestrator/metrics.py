"""Prometheus metrics on one registry per service; label values from bounded sets only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.accounting import BatchOutcome, NewCall
from orchestrator.budget_metrics import BudgetCollector
from shared.usage import BUCKETS

# The `type` label of tally_tokens_total is the bucket's name (shared.usage.BUCKETS).
BUCKET_ORDER = BUCKETS
TOKEN_TYPE = {bucket: bucket for bucket in BUCKETS}
# OpenTelemetry GenAI advised buckets.
GENAI_TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
GENAI_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
JOB_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


OTHER = "other"


def genai_operation(provider: str) -> str:
    """``gen_ai.operation.name`` of a call (required by the GenAI conventions): Gemini's API
    is ``generate_content``; every other provider Tally drives makes ``chat`` calls."""
    return "generate_content" if provider in ("google", "gemini") else "chat"


class LabelCap:
    """Admits at most ``cap`` distinct values; later ones collapse into ``other``.

    ``on_overflow`` is called once for each value refused, so that the collapse is counted.
    """

    def __init__(self, cap: int, on_overflow: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self._seen: set[str] = set()
        self._refused: set[str] = set()
        self._on_overflow = on_overflow

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.cap:
            if self._on_overflow is not None and value not in self._refused:
                # Remember up to a bound what was refused, so that the counter counts
                # distinct values rather than every call of a collapsed one.
                if len(self._refused) < 100_000:
                    self._refused.add(value)
                self._on_overflow()
            return OTHER
        self._seen.add(value)
        return value

    def fold(self, values: dict[str, int]) -> dict[str, int]:
        """A map of label value to number with values past the cap summed under ``other``."""
        out: dict[str, int] = {}
        for value, n in sorted(values.items()):
            label = self(value)
            out[label] = out.get(label, 0) + n
        return out


class _SnapshotCollector(Collector):
    """DB- and state-derived gauges read from the last snapshot, never a query per scrape."""

    def __init__(
        self,
        snapshot: Callable[[], tuple[dict[str, int], int, dict[str, int]]],
        queue_cap: LabelCap,
    ):
        self._snapshot = snapshot
        self._queue = queue_cap

    def collect(self) -> Iterable[GaugeMetricFamily]:
        raw_queued, daemons, slots = self._snapshot()
        queued = self._queue.fold(raw_queued)
        g = GaugeMetricFamily("tally_jobs_queued", "Jobs waiting in each queue.", labels=["queue"])
        for queue, n in sorted(queued.items()):
            g.add_metric([queue], n)
        yield g
        yield GaugeMetricFamily(
            "tally_daemons_connected", "Daemons connected to this orchestrator.", value=daemons
        )
        s = GaugeMetricFamily(
            "tally_daemon_slots", "Job slots of connected daemons by state.", labels=["state"]
        )
        for state in ("busy", "free", "draining"):
            s.add_metric([state], slots.get(state, 0))
        yield s


class Metrics:
    """Every metric the orchestrator exports, on its own registry."""

    def __init__(self, label_cap: int = 200) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.label_overflow = Counter(
            "tally_label_values_overflow",
            "Distinct label values past the label cap, counted under `other` instead.",
            ["label"],
            registry=r,
        )
        # Every label whose values come from frames or clients has its own cap.
        self.model = self._cap("model", label_cap)
        self.provider = self._cap("provider", label_cap)
        self.finish_reason = self._cap("finish_reason", label_cap)
        self.executor = self._cap("executor", label_cap)
        self.queue = self._cap("queue", label_cap)
        self.tool = self._cap("tool", label_cap)
        self.snapshot: tuple[dict[str, int], int, dict[str, int]] = ({}, 0, {})
        self.tokens = Counter(
            "tally_tokens_total",
            "Tokens recorded in the ledger, by kind.",
            ["provider", "model", "type"],
            registry=r,
        )
        self.cost = Counter(
            "tally_cost_usd_total",
            "Cost recorded in the ledger (USD).",
            ["provider", "model"],
            registry=r,
        )
        self.llm_calls = Counter(
            "tally_llm_calls_total",
            "LLM calls recorded.",
            ["provider", "model", "finish_reason"],
            registry=r,
        )
        self.llm_calls_unavailable = Counter(
            "tally_llm_calls_usage_unavailable_total",
            "LLM calls that reported no usage.",
            ["provider", "model"],
            registry=r,
        )
        self.llm_calls_inconsistent = Counter(
            "tally_llm_calls_usage_inconsistent",
            "LLM calls whose provider usage contradicted itself (recorded, the untrusted "
            "buckets unknown).",
            ["provider", "model"],
            registry=r,
        )
        self.llm_calls_unpriced = Counter(
            "tally_llm_calls_unpriced",
            "LLM calls recorded without a cost (no provider cost, no price): their cost is "
            "unknown, never counted as $0.",
            ["provider", "model"],
            registry=r,
        )
        self.llm_calls_unreported = Counter(
            "tally_llm_calls_unreported",
            "LLM calls that did not report a token bucket (counted nowhere, not as 0).",
            ["provider", "model", "type"],
            registry=r,
        )
        self.llm_call_duration = Histogram(
            "tally_llm_call_duration_seconds",
            "Duration of LLM calls.",
            ["provider", "model"],
            buckets=GENAI_DURATION_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "tally_jobs_total", "Jobs finished, by outcome.", ["executor", "outcome"], registry=r
        )
        self.executions_lost = Counter(
            "tally_executions_lost",
            "Executions declared lost after their lease expired.",
            registry=r,
        )
        self.job_duration = Histogram(
            "tally_job_duration_seconds",
            "Submission to completion time of finished jobs.",
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "tally_job_queue_wait_seconds",
            "Time jobs waited in the queue before an offer.",
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self._received: dict[str, Counter] = {}
        self.frames_received = Counter(
            "tally_frames_received", "Frames received, by type.", ["type"], registry=r
        )
        self.frames_rejected = Counter(
            "tally_frames_rejected", "Frames rejected, by reason.", ["reason"], registry=r
        )
        self.results_duplicate = Counter(
            "tally_results_duplicate",
            "Job frames received again and acknowledged again.",
            registry=r,
        )
        self.results_inconsistent = Counter(
            "tally_results_inconsistent",
            "Results whose totals disagree with the sums of their own modelUsage.",
            registry=r,
        )
        self.persist_batch_seconds = Histogram(
            "tally_persist_batch_seconds",
            "Time to persist one batch (one transaction).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.persist_batch_rows = Histogram(
            "tally_persist_batch_rows",
            "Frames per persisted batch.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.persist_failures = Counter(
            "tally_persist_failures", "Batches that failed and were retried.", registry=r
        )
        self.writer_pending = Gauge(
            "tally_writer_pending_frames", "Frames received and not yet durable.", registry=r
        )
        self.genai_tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per LLM call (OpenTelemetry GenAI).",
            [
                "gen_ai_operation_name",
                "gen_ai_provider_name",
                "gen_ai_request_model",
                "gen_ai_token_type",
            ],
            buckets=GENAI_TOKEN_BUCKETS,
            registry=r,
        )
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of LLM calls (OpenTelemetry GenAI).",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"],
            buckets=GENAI_DURATION_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "tally_tool_calls",
            "Tool calls agent loops answered, by tool and outcome (ok or error).",
            ["tool", "outcome"],
            registry=r,
        )
        self.tool_call_duration = Histogram(
            "tally_tool_call_duration_seconds",
            "Duration of the tool calls agent loops answered.",
            ["tool"],
            buckets=GENAI_DURATION_BUCKETS,
            registry=r,
        )
        # The OTLP export (tally serve --otlp-endpoint).
        self.otlp_exported = Counter(
            "tally_otlp_exported_attempts",
            "Decided attempts whose spans reached the OTLP endpoint (again after a late result).",
            registry=r,
        )
        self.otlp_spans = Counter(
            "tally_otlp_exported_spans", "Spans the OTLP endpoint accepted.", registry=r
        )
        self.otlp_failures = Counter(
            "tally_otlp_export_failures",
            "Span exports the OTLP endpoint did not accept (retried with backoff; the ledger "
            "keeps the attempts pending).",
            registry=r,
        )
        self.otlp_refused = Counter(
            "tally_otlp_refused_requests",
            "Span requests the OTLP endpoint refused while up (too large, HTTP 413, or "
            "otherwise refused for their content): split and sent again in halves.",
            registry=r,
        )
        self.otlp_dropped = Counter(
            "tally_otlp_dropped_spans",
            "Spans the OTLP endpoint refused even alone: not exported (logged); the ledger "
            "still holds their attempt and calls.",
            registry=r,
        )
        self.otlp_skipped = Counter(
            "tally_otlp_skipped_attempts",
            "Attempts dropped from the export because they were decided before the backlog "
            "horizon (--otlp-backlog-hours); the ledger still holds them.",
            registry=r,
        )
        self.otlp_backlog = Gauge(
            "tally_otlp_backlog_attempts",
            "Decided attempts waiting for export (read by the exporting orchestrator).",
            registry=r,
        )
        self.otlp_leader = Gauge(
            "tally_otlp_exporting",
            "1 on the orchestrator that currently exports over OTLP, 0 on the others.",
            registry=r,
        )
        r.register(_SnapshotCollector(lambda: self.snapshot, self.queue))
        self.budget = self._cap("budget", label_cap)
        # Budget standings (orchestrator.store.budgets.Standing), refreshed by the upkeep.
        self.budgets: list[Any] = []
        r.register(BudgetCollector(lambda: self.budgets, self.budget))

    def _cap(self, label: str, cap: int) -> LabelCap:
        child = self.label_overflow.labels(label)
        return LabelCap(cap, child.inc)

    def count_received(self, frame_type: str) -> None:
        """Count one received frame (the labelled child is looked up once per type)."""
        child = self._received.get(frame_type)
        if child is None:
            child = self._received[frame_type] = self.frames_received.labels(frame_type)
        child.inc()

    def record_batch(self, outcome: BatchOutcome) -> None:
        """Count what a committed batch newly recorded: each token exactly once."""
        self._count_usage(outcome)
        for call in outcome.new_calls:
            self._count_call(call)
        self._count_finished(outcome)
        for name, error, duration_ms in outcome.new_tools:
            tool = self.tool(name.replace("\x00", "\ufffd"))  # the name as the ledger stores it
            self.tool_calls.labels(tool, "error" if error else "ok").inc()
            self.tool_call_duration.labels(tool).observe(duration_ms / 1000)
        if outcome.inconsistent:
            self.results_inconsistent.inc(outcome.inconsistent)

    def _count_usage(self, outcome: BatchOutcome) -> None:
        # Summed per (provider, model) first: one increment per series per batch, not per
        # result (a batch holds up to thousands of results over a handful of models).
        tokens: dict[tuple[str, str, str], int] = {}
        cost: dict[tuple[str, str], float] = {}
        for (raw_provider, raw_model), sums in outcome.counted.items():
            if not sums:
                continue  # a model that used nothing takes no place under the label cap
            provider = self.provider(raw_provider)
            model = self.model(raw_model)  # models past the cap collapse into one series
            for bucket, value in sums.tokens().items():
                if value:
                    key = (provider, model, bucket)
                    tokens[key] = tokens.get(key, 0) + value
            if sums.cost:
                cost[(provider, model)] = cost.get((provider, model), 0.0) + sums.cost
        for (provider, model, bucket), value in tokens.items():
            self.tokens.labels(provider, model, TOKEN_TYPE[bucket]).inc(value)
        for (provider, model), amount in cost.items():
            self.cost.labels(provider, model).inc(amount)

    def _count_call(self, call: NewCall) -> None:
        model = self.model(call.model)
        provider = self.provider(call.provider)
        self.llm_calls.labels(provider, model, self.finish_reason(call.finish_reason)).inc()
        if call.unavailable:
            self.llm_calls_unavailable.labels(provider, model).inc()
        if not call.priced:
            self.llm_calls_unpriced.labels(provider, model).inc()
        if call.inconsistent:
            self.llm_calls_inconsistent.labels(provider, model).inc()
        for bucket in BUCKET_ORDER:
            if getattr(call.usage, bucket) is None:
                self.llm_calls_unreported.labels(provider, model, TOKEN_TYPE[bucket]).inc()
        operation = genai_operation(call.provider)
        if call.duration_ms is not None:
            self.llm_call_duration.labels(provider, model).observe(call.duration_ms / 1000)
            self.genai_duration.labels(operation, provider, model).observe(call.duration_ms / 1000)
        total_input = call.usage.total_input
        if total_input is not None:
            self.genai_tokens.labels(operation, provider, model, "input").observe(total_input)
        if call.usage.output is not None:
            self.genai_tokens.labels(operation, provider, model, "output").observe(
                call.usage.output
            )

    def _count_finished(self, outcome: BatchOutcome) -> None:
        finished: dict[tuple[str, str], int] = {}
        for job in outcome.finished_jobs:
            outcome_key = (self.executor(job.executor), job.status)
            finished[outcome_key] = finished.get(outcome_key, 0) + 1
            if job.duration_seconds is not None:
                self.job_duration.observe(job.duration_seconds)
        for (executor, status), n in finished.items():
            self.jobs.labels(executor, status).inc(n)

    def count_job(self, executor: str, outcome: str, n: int = 1) -> None:
        """Count jobs finished outside a ledger batch (reaped, rejected), executor capped."""
        self.jobs.labels(self.executor(executor), outcome).inc(n)

"""What every executor is built from: the call record, the outcome, the job context with its
limits and budget planning, and the errors an executor raises."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, get_args

import msgspec

from daemon.pricing import EMPTY, PriceBook, price
from daemon.tools import registered
from shared import protocol as p
from shared.limits import MAX_COUNTER, MAX_MILLIS, MAX_MONEY, CostSource, fit_name, fit_number
from shared.usage import CallUsage, Usage

COST_SOURCES = frozenset(get_args(CostSource))


class StreamCutError(RuntimeError):
    """A streamed response ended before it finished (no finish or stop reason arrived)."""


@dataclass(frozen=True, slots=True)
class LLMCall:
    """One finished LLM call in Tally's usage convention."""

    provider: str
    request_model: str | None
    response_model: str | None
    usage: Usage
    finish_reason: str | None = None
    cost_usd: float | None = None
    cost_source: str | None = None
    duration_ms: float | None = None
    request_id: str | None = None
    tokens_unavailable: bool = False
    # The 1-hour part of usage.cache_creation, when the provider splits cache writes.
    cache_creation_1h: int | None = None
    # The provider's usage contradicted itself (cached above prompt, a negative count...):
    # what could not be trusted is unknown in ``usage``, and the call is flagged.
    usage_inconsistent: bool = False
    # When the input's split is unknown: an upper bound of the call's total input tokens
    # (:func:`shared.usage.input_bound`), counted against the job's limits, never sent.
    input_bound: int | None = None

    @property
    def model(self) -> str:
        """The model the call is attributed to (the response's, else the request's)."""
        return self.response_model or self.request_model or "unknown"

    def fitted(self) -> LLMCall:
        """The call as the wire can carry it, whatever the provider answered: names cut to
        256 characters (empty ones omitted, the provider ``unknown``), counts that are not
        counts unknown and the call flagged, costs and durations out of range unknown.

        A price computed from a usage that had to be corrected would be a guess: unknown.
        """
        usage, flagged = self.usage.trusted()
        cost = fit_number(self.cost_usd, MAX_MONEY)
        source = self.cost_source if self.cost_source in COST_SOURCES else None
        if flagged and source in ("price_table", "price_override"):
            cost = None
        if cost is None and source is not None:
            source = "unpriced"
        one_hour = self.cache_creation_1h
        if one_hour is not None and (
            type(one_hour) is not int
            or not 0 <= one_hour <= MAX_COUNTER
            or (usage.cache_creation is not None and one_hour > usage.cache_creation)
        ):
            one_hour = None
        return LLMCall(
            provider=fit_name(self.provider) or "unknown",
            request_model=fit_name(self.request_model),
            response_model=fit_name(self.response_model),
            usage=usage,
            finish_reason=fit_name(self.finish_reason),
            cost_usd=cost,
            cost_source=source,
            duration_ms=fit_number(self.duration_ms, MAX_MILLIS),
            request_id=fit_name(self.request_id),
            tokens_unavailable=self.tokens_unavailable or usage.is_unknown,
            cache_creation_1h=one_hour,
            usage_inconsistent=self.usage_inconsistent or flagged,
            input_bound=self.input_bound
            if type(self.input_bound) is int and self.input_bound >= 0
            else None,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an executor's run ended."""

    success: bool = True
    error_message: str | None = None
    stop_reason: str = "end_turn"
    # An executor whose SDK reports the job's own totals (Claude Agent SDK) sets these;
    # otherwise the result is the sum of the calls.
    model_usage: list[CallUsage] | None = None
    cost_usd: float | None = None
    cost_source: str | None = None
    num_turns: int | None = None
    # A failure: "retryable" or "permanent" (daemon/failures.py), and the provider's
    # retry-after.
    error_class: str | None = None
    retry_after_ms: float | None = None
    # What the agent answered: its final text, or the JSON object the spec's outputSchema
    # asked for. None: nothing to report.
    output: str | dict[str, Any] | None = None


class StopJob(Exception):
    """Raised by the context when a limit is reached; the runner ends the job with its reason.

    ``success`` is False for a stop that means the job could not run as asked (``unpriced``).
    """

    def __init__(self, stop_reason: str, message: str, success: bool = True) -> None:
        super().__init__(message)
        self.stop_reason = stop_reason
        self.success = success


# Per-token rates of a model for budget planning: (worst input rate, output rate) in USD, or
# None when the model has no price.
Rates = tuple[float, float] | None
MILLION = 1_000_000


def estimate_tokens(value: Any) -> int:
    """A generous token estimate of a request's content: its UTF-8 bytes / 3.

    English runs about 4 characters a token and CJK 1 character (3 bytes) a token, so this
    over-counts the first and matches the second; the budget's bound is stated against it.
    """
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return len(text.encode()) // 3 + 1


@dataclass(frozen=True, slots=True)
class ToolRun:
    """One tool call an agent loop answered: its shape, never its arguments or result."""

    name: str
    after_call: int | None
    started_at_ms: float
    duration_ms: float
    arguments_bytes: int
    result_bytes: int
    error: bool


async def _no_tool_report(_run: ToolRun) -> None:
    return None


@dataclass
class JobContext:
    """What an executor sees of a job: its input, its limits, and where to report calls."""

    execution_id: str
    job_id: str
    model: str | None
    spec: dict[str, Any]
    limits: p.Limits
    emit: Callable[[LLMCall], Awaitable[None]]
    calls: list[LLMCall] = field(default_factory=list)
    prices: PriceBook = EMPTY
    emit_tool: Callable[[ToolRun], Awaitable[None]] = _no_tool_report
    tool_runs: list[ToolRun] = field(default_factory=list)
    # What the recorded calls count against the job's limits (:meth:`_count`): their own
    # figures, and upper bounds of what the provider left unknown.
    counted_usd: float = field(default=0.0, init=False)
    counted_tokens: int = field(default=0, init=False)
    counted_output: int = field(default=0, init=False)
    # The plan of the call being made (:meth:`plan_call`): the model's rates, the input
    # estimate and the output cap. What bounds that call when its usage is unknown.
    _plan: tuple[Rates, int, int] = field(default=(None, 0, 0), init=False, repr=False)

    async def run_tool(self, name: str, arguments: dict[str, Any] | str, allowed: list[str]) -> str:
        """Answer one tool call of the model and report it (``job:tool``); return the text the
        model gets back. A tool that raises, a tool the spec did not offer and arguments that
        are not a JSON object are answered with the error, so the model can go on."""
        started_at_ms = time.time() * 1000
        started = time.perf_counter()
        error = True
        if name not in allowed:
            text = f"error: no tool named {name!r} is offered to this job"
        elif not isinstance(arguments, dict):
            text = "error: the arguments are not a JSON object"
        else:
            tool, _schema = registered()[name]
            try:
                answer = await asyncio.to_thread(tool, arguments)
                text = answer if isinstance(answer, str) else json.dumps(answer, default=str)
                error = False
            except Exception as exc:  # the tool's failure is the model's to handle
                text = f"error: {type(exc).__name__}: {exc}"
        raw = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        run = ToolRun(
            name=name[:256] or "unnamed",
            after_call=len(self.calls) - 1 if self.calls else None,
            started_at_ms=started_at_ms,
            duration_ms=(time.perf_counter() - started) * 1000,
            arguments_bytes=len(raw.encode("utf-8", "surrogatepass")),
            result_bytes=len(text.encode("utf-8", "surrogatepass")),
            error=error,
        )
        self.tool_runs.append(run)
        await self.emit_tool(run)
        return text

    def price(
        self, provider: str, model: str, usage: Usage, cache_creation_1h: int | None = None
    ) -> tuple[float | None, str]:
        """A call's cost and costSource: the operator's override, the price table at the
        call's time, or ``(None, "unpriced")``. Never raises: it runs after the provider
        answered, and a call the provider answered is recorded, priced or not."""
        try:
            return price(provider, model, usage, cache_creation_1h, datetime.now(UTC), self.prices)
        except Exception:  # a price table's fault is not the call's
            return None, "unpriced"

    @property
    def usage(self) -> Usage:
        """Usage of the calls so far."""
        return Usage.sum(c.usage for c in self.calls)

    @property
    def cost(self) -> float:
        """What the calls so far count against ``budgetUsd``: their known costs, and for a
        call whose cost is unknown on a model with rates, its upper bound (:meth:`_count`).
        The calls' own costs stay unknown in what is reported."""
        return self.counted_usd

    def _count(self, call: LLMCall) -> None:
        """Add a recorded call to what counts against the job's limits, never an unknown as
        0: an input the provider left unknown counts its bound (the provider's counts added
        up, :attr:`LLMCall.input_bound`, else the call's planned input estimate), an unknown
        output the call's output cap, and an unknown cost those tokens at the model's worst
        input rate and its output rate (0 only when the model has no rates: unpriced, or a job
        without ``budgetUsd``)."""
        rates, estimate, cap = self._plan
        usage = call.usage
        if usage.input is not None:
            tokens_in = usage.total_input or 0
        elif call.input_bound is not None:
            tokens_in = max(call.input_bound, usage.total_input or 0)
        else:
            tokens_in = max(estimate, usage.total_input or 0)
        tokens_out = usage.output if usage.output is not None else cap
        self.counted_tokens += tokens_in + tokens_out
        self.counted_output += tokens_out
        if call.cost_usd is not None:
            self.counted_usd += call.cost_usd
        elif rates is not None:
            per_input, per_output = rates
            self.counted_usd += tokens_in * per_input + tokens_out * per_output

    def limit(self, name: str) -> Any:
        """A limit of the offer (``max_turns``, ``budget_usd``...), None when not set."""
        value = getattr(self.limits, name)
        return None if value is msgspec.UNSET else value

    def check_before_call(self) -> None:
        """Raise StopJob when another call would pass a limit already reached."""
        max_turns = self.limit("max_turns")
        if max_turns is not None and len(self.calls) >= max_turns:
            raise StopJob("max_turns", f"reached maxTurns={max_turns}")
        self._check_totals()

    def _check_totals(self) -> None:
        max_total = self.limit("max_total_tokens")
        if max_total is not None and self.counted_tokens >= max_total:
            raise StopJob("max_total_tokens", f"used {self.counted_tokens} tokens of {max_total}")
        max_output = self.limit("max_output_tokens")
        if max_output is not None and self.counted_output >= max_output:
            raise StopJob(
                "max_output_tokens", f"used {self.counted_output} output tokens of {max_output}"
            )
        budget = self.limit("budget_usd")
        if budget is not None and self.cost >= budget:
            raise StopJob("budget", f"spent ${self.cost:.6f} of ${budget}")

    @property
    def budgeted(self) -> bool:
        """Whether the job has a ``budgetUsd`` (only then are rates looked up per job)."""
        return self.limit("budget_usd") is not None

    def rates(self, provider: str, model: str) -> Rates:
        """Per-token rates for planning a call: the worst input rate (uncached input, 5-minute
        and 1-hour cache writes; cache reads are cheaper) and the output rate; None when the
        model has no price (neither override nor table)."""
        probe = Usage(MILLION, 0, 0, 0, None)
        per_input, _ = self.price(provider, model, probe)
        if per_input is None:
            return None
        writes_5m, _ = self.price(provider, model, Usage(0, 0, 0, MILLION, None))
        writes_1h, _ = self.price(provider, model, Usage(0, 0, 0, MILLION, None), MILLION)
        per_output, _ = self.price(provider, model, Usage(0, MILLION, 0, 0, None))
        worst_input = max(per_input, writes_5m or 0.0, writes_1h or 0.0)
        return worst_input / MILLION, (per_output or 0.0) / MILLION

    def plan_call(self, rates: Rates, input_estimate: int, max_output: int) -> int:
        """Before a call: stop if a limit is reached, else the output tokens it may use.

        With ``budgetUsd`` set, the call's output is capped so that its worst case (the
        estimated input at the worst input rate, plus the output cap at the output rate)
        stays within what remains; when what remains cannot pay for the input, the job
        stops (``budget``). A model without a price stops a budgeted job before its first
        call (``unpriced``), unless its spec says ``"allowUnpriced": true``.
        """
        self.check_before_call()
        room = self.remaining_output_tokens(max_output)
        self._plan = (rates, input_estimate, room)
        budget = self.limit("budget_usd")
        if budget is None:
            return room
        if rates is None:
            if self.spec.get("allowUnpriced") is True:
                return room
            raise StopJob(
                "unpriced",
                f"budgetUsd={budget} is set but the model has no price (no override, not in "
                'the price table); set "allowUnpriced": true in the spec to run it anyway',
                success=False,
            )
        per_input, per_output = rates
        left = budget - self.cost - input_estimate * per_input
        if left <= 0:
            raise StopJob(
                "budget",
                f"spent ${self.cost:.6f} of ${budget}; the next call's input "
                f"(~{input_estimate} tokens) would pass it",
            )
        if per_output > 0:
            room = min(room, int(left / per_output))
        if room < 1:
            raise StopJob("budget", f"spent ${self.cost:.6f} of ${budget}: no room for output")
        self._plan = (rates, input_estimate, room)
        return room

    def remaining_output_tokens(self, default: int) -> int:
        """Output tokens the next call may use without passing a limit."""
        room = default
        max_output = self.limit("max_output_tokens")
        if max_output is not None:
            room = min(room, max_output - self.counted_output)
        max_total = self.limit("max_total_tokens")
        if max_total is not None:
            room = min(room, max_total - self.counted_tokens)
        return max(1, room)

    async def record(self, call: LLMCall, *, enforce: bool = True) -> None:
        """Report a finished call (it is made durable and streamed), then enforce limits.

        The call is first fitted to the wire (:meth:`LLMCall.fitted`): a provider's answer is
        recorded whatever it holds."""
        call = call.fitted()
        self.calls.append(call)
        self._count(call)
        await self.emit(call)
        if enforce:
            self._check_totals()


class Executor(Protocol):
    """An executor runs one job's LLM calls and reports each through ``ctx.record``."""

    name: str
    models: list[str]

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Raise SpecError if the spec cannot be run."""

    async def run(self, ctx: JobContext) -> Outcome:
        """Run the job; raise StopJob (via ctx) or return how it ended."""


async def sleep_ms(ms: float) -> None:
    """Sleep for milliseconds (0 yields once)."""
    await asyncio.sleep(max(0.0, ms) / 1000)

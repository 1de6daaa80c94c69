"""Runs one job under its limits and turns its calls into ``job:generation`` and ``job:result``.

Every frame built here is one the orchestrator accepts, whatever the provider answered: names
are cut to 256 characters (empty ones omitted), free text cut and marked cut, counts that are
not counts unknown, numbers out of range omitted (:meth:`LLMCall.fitted`, :func:`result_frame`).
And every run ends in a ``job:result``, even when the executor, the failure classifier or the
result's own building raises (:func:`minimal_result`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, get_args

import msgspec

from daemon.executors import Executor, JobContext, LLMCall, Outcome, StopJob
from daemon.executors.base import COST_SOURCES, ToolRun
from daemon.failures import classify
from daemon.pricing import EMPTY, PriceBook
from shared import protocol as p
from shared.limits import (
    MAX_COUNTER,
    MAX_MILLIS,
    MAX_MONEY,
    MAX_RETRY_AFTER_MS,
    MAX_TIMESTAMP,
    MAX_TURNS,
    ErrorClass,
    StopReason,
    fit_name,
    fit_number,
    fit_text,
    valid_text,
)
from shared.output import DEFAULT_MAX_OUTPUT_BYTES, cut_text, depth, fit
from shared.usage import CallUsage, Usage, rollup, total_cost

log = logging.getLogger(__name__)

JobFrame = p.JobGeneration | p.JobTool | p.JobResult
Emit = Callable[[JobFrame], Awaitable[None]]

STOP_REASONS = frozenset(get_args(StopReason))
ERROR_CLASSES = frozenset(get_args(ErrorClass))
MAX_MODEL_ENTRIES = 1000  # ResultPayload.model_usage's limit
# A result frame stays well under the orchestrator's default 1 MiB frame limit (a frame past
# it closes the link, and would be resent after every reconnect): its answer and then its
# per-model entries give way first (:func:`fit_result`). An orchestrator that advertises a
# smaller limit (``daemon:registered``'s maxFrameBytes) gets frames that much smaller, with
# FRAME_MARGIN_BYTES to spare.
MAX_RESULT_BYTES = 960 * 1024
FRAME_MARGIN_BYTES = 1024


def unset_if_none(value: Any) -> Any:
    """None becomes UNSET (omitted on the wire)."""
    return msgspec.UNSET if value is None else value


def started_at(call: LLMCall) -> float | msgspec.UnsetType:
    """When a call started (epoch ms): it is recorded as it ends, ``duration_ms`` after."""
    if call.duration_ms is None:
        return msgspec.UNSET
    return max(0.0, p.now_ms() - call.duration_ms)


def generation_frame(execution_id: str, seq: int, call: LLMCall) -> p.JobGeneration:
    """The ``job:generation`` of one call, fitted to the wire (see :meth:`LLMCall.fitted`)."""
    call = call.fitted()
    return p.make(
        p.JobGeneration,
        p.GenerationPayload(
            seq=seq,
            provider=call.provider,
            request_model=unset_if_none(call.request_model),
            response_model=unset_if_none(call.response_model),
            finish_reason=unset_if_none(call.finish_reason),
            tokens_unavailable=True
            if (call.tokens_unavailable or call.usage.is_unknown)
            else msgspec.UNSET,
            cost_usd=unset_if_none(call.cost_usd),
            cost_source=unset_if_none(call.cost_source),
            duration_ms=unset_if_none(call.duration_ms),
            request_id=unset_if_none(call.request_id),
            started_at=started_at(call),
            cache_creation_1h_input_tokens=unset_if_none(call.cache_creation_1h),
            usage_inconsistent=True if call.usage_inconsistent else msgspec.UNSET,
            **call.usage.to_struct_kwargs(),
        ),
        execution_id,
    )


def tool_frame(execution_id: str, seq: int, run: ToolRun) -> p.JobTool:
    """The ``job:tool`` of one answered tool call."""
    return p.make(
        p.JobTool,
        p.ToolPayload(
            seq=seq,
            name=fit_name(run.name) or "unnamed",
            after_call=unset_if_none(run.after_call),
            started_at=fit_number(run.started_at_ms, MAX_TIMESTAMP) or p.now_ms(),
            duration_ms=fit_number(run.duration_ms, MAX_MILLIS) or 0.0,
            arguments_bytes=min(max(0, run.arguments_bytes), MAX_COUNTER),
            result_bytes=min(max(0, run.result_bytes), MAX_COUNTER),
            error=run.error,
        ),
        execution_id,
    )


def _fitted_entries(per_call: list[CallUsage]) -> list[p.ModelUsage] | None:
    """The per-model entries, or None when they cannot travel (more than the wire's 1000
    models, a sum past a counter's range): the totals still carry the job's usage."""
    try:
        entries = [msgspec.convert(r.to_wire(), p.ModelUsage) for r in rollup(per_call)]
    except msgspec.ValidationError:
        return None
    return entries if len(entries) <= MAX_MODEL_ENTRIES else None


def _fitted_output(
    value: str | dict[str, Any] | None, max_bytes: int
) -> tuple[str | dict[str, Any] | None, bool]:
    """The answer as the wire carries it: cut to ``max_bytes``; an object nested deeper than a
    frame may carry, or one no encoder takes, travels as its (cut) JSON text."""
    if value is None:
        return None, False
    try:
        if isinstance(value, dict) and depth(value) > p.OUTPUT_DEPTH:
            raise ValueError("nested too deeply")
        if isinstance(value, str):
            value = valid_text(value)
        return fit(value, max_bytes)
    except Exception:
        text = valid_text(json.dumps(value, ensure_ascii=False, default=str))
        return cut_text(text, max_bytes)[0], True


def result_frame(
    execution_id: str,
    calls: list[LLMCall],
    outcome: Outcome,
    duration_ms: float,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> p.JobResult:
    """The ``job:result``: totals are the sum of the calls, per-model entries their rollup.

    Fitted to the wire: names mapped, text cut and marked, numbers out of range omitted, and
    the whole frame kept under :data:`MAX_RESULT_BYTES`.
    """
    if outcome.model_usage is not None:
        # The SDK reported the job's totals itself: they are the result.
        per_call = [
            CallUsage(
                fit_name(c.model) or "unknown",
                c.usage.trusted()[0],
                fit_number(c.cost_usd, MAX_MONEY),
                fit_name(c.provider),
            )
            for c in outcome.model_usage
        ]
        cost = fit_number(outcome.cost_usd, MAX_MONEY)
        sources = {outcome.cost_source} if outcome.cost_source else set()
    else:
        calls = [c.fitted() for c in calls]
        per_call = [CallUsage(c.model, c.usage, c.cost_usd, c.provider) for c in calls]
        cost = fit_number(total_cost(per_call), MAX_MONEY)
        sources = {c.cost_source for c in calls if c.cost_source}
    totals = Usage.sum(c.usage for c in per_call).trusted()[0]
    known_1h = [c.cache_creation_1h for c in calls if c.cache_creation_1h is not None]
    one_hour = sum(known_1h) if known_1h and outcome.model_usage is None else None
    entries = _fitted_entries(per_call)
    unavailable = bool(per_call) and all(c.usage.is_unknown for c in per_call)
    answer, cut = _fitted_output(outcome.output, max_output_bytes)
    num_turns = outcome.num_turns if outcome.num_turns is not None else len(calls)
    source = sources.pop() if len(sources) == 1 else None
    error_class = outcome.error_class if outcome.error_class in ERROR_CLASSES else None
    if error_class is None and not outcome.success:
        error_class = "permanent"

    def build(answer: Any, entries: list[p.ModelUsage] | None) -> p.JobResult:
        return p.make(
            p.JobResult,
            p.ResultPayload(
                success=outcome.success,
                error_message=fit_text(outcome.error_message)
                if outcome.error_message
                else msgspec.UNSET,
                stop_reason=outcome.stop_reason  # type: ignore[arg-type]
                if outcome.stop_reason in STOP_REASONS
                else "error",
                duration_ms=fit_number(duration_ms, MAX_MILLIS) or 0.0,
                num_turns=min(max(0, num_turns), MAX_TURNS)
                if type(num_turns) is int
                else min(len(calls), MAX_TURNS),
                cost_usd=unset_if_none(cost),
                cost_source=source if source in COST_SOURCES else msgspec.UNSET,  # type: ignore[arg-type]
                model_usage=entries if entries else msgspec.UNSET,
                tokens_unavailable=True if unavailable else msgspec.UNSET,
                cache_creation_1h_input_tokens=unset_if_none(
                    one_hour if one_hour is not None and one_hour <= MAX_COUNTER else None
                ),
                error_class=unset_if_none(error_class),
                retry_after_ms=unset_if_none(
                    fit_number(outcome.retry_after_ms, MAX_RETRY_AFTER_MS)
                ),
                output=unset_if_none(answer),
                output_truncated=True if cut else msgspec.UNSET,
                **totals.to_struct_kwargs(),
            ),
            execution_id,
        )

    return fit_result(build(answer, entries), MAX_RESULT_BYTES)


def frame_limit(advertised: int | None) -> int:
    """The size every job frame is fitted to: :data:`MAX_RESULT_BYTES`, or less when the
    orchestrator advertised a smaller frame limit (``daemon:registered``'s maxFrameBytes)."""
    if advertised is None:
        return MAX_RESULT_BYTES
    return min(MAX_RESULT_BYTES, advertised - FRAME_MARGIN_BYTES)


def _size(frame: p.JobResult) -> int:
    return len(p.encode(frame))


def fit_result(result: p.JobResult, max_bytes: int) -> p.JobResult:
    """The result within ``max_bytes`` encoded: its answer cut to what is left (and marked
    cut), then its per-model entries left out (its totals still carry its usage); last, when
    even that is too large, a minimal result saying so (the orchestrator then takes the sum of
    the calls it recorded). Never raises."""
    try:
        if _size(result) <= max_bytes:
            return result
        payload = result.payload
        answer = payload.output
        if answer is not msgspec.UNSET:
            text = answer if isinstance(answer, str) else p.encode_json(answer)
            payload = msgspec.structs.replace(payload, output="", output_truncated=True)
            result = msgspec.structs.replace(result, payload=payload)
            room = max_bytes - _size(result) + 2  # what the answer's JSON string may take
            cut = cut_text(text, room)[0] if room > 2 else ""
            payload = msgspec.structs.replace(payload, output=cut or msgspec.UNSET)
            result = msgspec.structs.replace(result, payload=payload)
        if _size(result) > max_bytes and payload.model_usage is not msgspec.UNSET:
            payload = msgspec.structs.replace(payload, model_usage=msgspec.UNSET)
            result = msgspec.structs.replace(result, payload=payload)
        if _size(result) <= max_bytes:
            return result
    except Exception:  # defence in depth: the attempt still ends
        log.exception("could not fit the result of %s", result.id)
    return minimal_result(
        result.id,
        f"this attempt's job:result could not be made to fit the orchestrator's frame limit "
        f"({max_bytes} bytes); the attempt's usage is the sum of its recorded calls",
        fit_number(getattr(result.payload, "duration_ms", None), MAX_MILLIS) or 0.0,
    )


def minimal_result(execution_id: str, message: str, duration_ms: float = 0.0) -> p.JobResult:
    """A result any orchestrator accepts: a failed attempt, its reason, no totals (the
    orchestrator takes the sum of the calls it recorded). The last resort of every run."""
    return p.make(
        p.JobResult,
        p.ResultPayload(
            success=False,
            error_message=fit_text(message),
            stop_reason="error",
            duration_ms=fit_number(duration_ms, MAX_MILLIS) or 0.0,
            error_class="permanent",
        ),
        execution_id,
    )


def _failure(exc: Exception, job_id: str) -> Outcome:
    """The outcome of an executor that raised: classified (retryable or permanent). Never
    raises (:func:`classify` and :func:`fit_text` are total)."""
    error_class, retry_after = classify(exc)
    message = fit_text(f"{type(exc).__name__}: {fit_text(exc)}")
    log.info("job %s failed (%s): %.1000s", job_id, error_class, message)
    return Outcome(
        success=False,
        error_message=message,
        stop_reason="error",
        error_class=error_class,
        retry_after_ms=retry_after,
    )


async def run_job(
    executor: Executor,
    offer: p.JobOffer,
    emit: Emit,
    prices: PriceBook = EMPTY,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> p.JobResult:
    """Run an offered job to its result; cancellation still yields a result of what it spent."""
    started = time.perf_counter()
    payload = offer.payload
    seq = 0
    tool_seq = 0

    async def emit_tool(run: ToolRun) -> None:
        nonlocal tool_seq
        frame = tool_frame(offer.id, tool_seq, run)
        tool_seq += 1
        await emit(frame)

    async def emit_call(call: LLMCall) -> None:
        nonlocal seq
        frame = generation_frame(offer.id, seq, call)
        seq += 1
        await emit(frame)

    ctx = JobContext(
        execution_id=offer.id,
        job_id=payload.job_id,
        model=payload.model if isinstance(payload.model, str) else None,
        spec=payload.spec,
        limits=payload.limits,
        emit=emit_call,
        prices=prices,
        emit_tool=emit_tool,
    )
    timeout_ms = payload.limits.timeout_ms
    timeout = None if timeout_ms is msgspec.UNSET else float(timeout_ms) / 1000
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            outcome = await executor.run(ctx)
    except StopJob as stop:
        outcome = Outcome(
            success=stop.success,
            error_message=str(stop),
            stop_reason=stop.stop_reason,
            error_class=None if stop.success else "permanent",  # a limit: the same next time
        )
    except TimeoutError as exc:
        if deadline.expired():
            # The job's own timeout.
            outcome = Outcome(
                success=False,
                error_message=f"timed out after {timeout_ms} ms",
                stop_reason="timeout",
                error_class="permanent",
            )
        else:
            # Raised inside an SDK (a request or read timeout): the provider's fault.
            outcome = _failure(exc, payload.job_id)
    except asyncio.CancelledError:
        outcome = Outcome(
            success=False,
            error_message="cancelled",
            stop_reason="cancelled",
            error_class="permanent",
        )
    except Exception as exc:
        outcome = _failure(exc, payload.job_id)
    duration_ms = (time.perf_counter() - started) * 1000
    try:
        result = result_frame(offer.id, ctx.calls, outcome, duration_ms, max_output_bytes)
    except Exception as exc:  # defence in depth: the attempt still ends
        log.exception("job %s: its result could not be built", payload.job_id)
        result = minimal_result(
            offer.id,
            f"the daemon could not build this attempt's result ({type(exc).__name__})",
            duration_ms,
        )
    await emit(result)
    return result

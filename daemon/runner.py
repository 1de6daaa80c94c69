"""Runs one job under its limits and turns its calls into ``job:generation`` and ``job:result``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from daemon.executors import Executor, JobContext, LLMCall, Outcome, StopJob
from daemon.executors.base import ToolRun
from daemon.failures import classify
from daemon.pricing import EMPTY, PriceBook
from shared import protocol as p
from shared.output import DEFAULT_MAX_OUTPUT_BYTES, fit
from shared.usage import CallUsage, Usage, rollup, total_cost

log = logging.getLogger("tally.runner")

JobFrame = p.JobGeneration | p.JobTool | p.JobResult
Emit = Callable[[JobFrame], Awaitable[None]]


def opt(value: Any) -> Any:
    """None becomes UNSET (omitted on the wire)."""
    return msgspec.UNSET if value is None else value


def started_at(call: LLMCall) -> float | msgspec.UnsetType:
    """When a call started (epoch ms): it is recorded as it ends, ``duration_ms`` after."""
    if call.duration_ms is None:
        return msgspec.UNSET
    return max(0.0, p.now_ms() - call.duration_ms)


def generation_frame(execution_id: str, seq: int, call: LLMCall) -> p.JobGeneration:
    """The ``job:generation`` of one call."""
    return p.make(
        p.JobGeneration,
        p.GenerationPayload(
            seq=seq,
            provider=call.provider,
            request_model=opt(call.request_model),
            response_model=opt(call.response_model),
            finish_reason=opt(call.finish_reason),
            tokens_unavailable=True
            if (call.tokens_unavailable or call.usage.is_unknown)
            else msgspec.UNSET,
            cost_usd=opt(call.cost_usd),
            cost_source=opt(call.cost_source),
            duration_ms=opt(call.duration_ms),
            request_id=opt(call.request_id),
            started_at=started_at(call),
            cache_creation_1h_input_tokens=opt(call.cache_creation_1h),
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
            name=run.name,
            after_call=opt(run.after_call),
            started_at=run.started_at_ms,
            duration_ms=run.duration_ms,
            arguments_bytes=run.arguments_bytes,
            result_bytes=run.result_bytes,
            error=run.error,
        ),
        execution_id,
    )


def result_frame(
    execution_id: str,
    calls: list[LLMCall],
    outcome: Outcome,
    duration_ms: float,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> p.JobResult:
    """The ``job:result``: totals are the sum of the calls, per-model entries their rollup."""
    if outcome.model_usage is not None:
        # The SDK reported the job's totals itself: they are the result.
        per_call = outcome.model_usage
        cost = outcome.cost_usd
        sources = {outcome.cost_source} if outcome.cost_source else set()
    else:
        per_call = [CallUsage(c.model, c.usage, c.cost_usd, c.provider) for c in calls]
        cost = total_cost(per_call)
        sources = {c.cost_source for c in calls if c.cost_source}
    totals = Usage.sum(c.usage for c in per_call)
    known_1h = [c.cache_creation_1h for c in calls if c.cache_creation_1h is not None]
    one_hour = sum(known_1h) if known_1h and outcome.model_usage is None else None
    entries = [msgspec.convert(r.to_wire(), p.ModelUsage) for r in rollup(per_call)]
    unavailable = bool(per_call) and all(c.usage.is_unknown for c in per_call)
    answer, cut = (
        fit(outcome.output, max_output_bytes) if outcome.output is not None else (None, False)
    )
    return p.make(
        p.JobResult,
        p.ResultPayload(
            success=outcome.success,
            error_message=outcome.error_message if outcome.error_message else msgspec.UNSET,
            stop_reason=outcome.stop_reason,  # type: ignore[arg-type]
            duration_ms=duration_ms,
            num_turns=outcome.num_turns if outcome.num_turns is not None else len(calls),
            cost_usd=cost if cost is not None else msgspec.UNSET,
            cost_source=sources.pop() if len(sources) == 1 else msgspec.UNSET,  # type: ignore[arg-type]
            model_usage=entries if entries else msgspec.UNSET,
            tokens_unavailable=True if unavailable else msgspec.UNSET,
            cache_creation_1h_input_tokens=opt(one_hour),
            error_class=opt(outcome.error_class),
            retry_after_ms=opt(outcome.retry_after_ms),
            output=opt(answer),
            output_truncated=True if cut else msgspec.UNSET,
            **totals.to_struct_kwargs(),
        ),
        execution_id,
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
    try:
        async with asyncio.timeout(timeout):
            outcome = await executor.run(ctx)
    except StopJob as stop:
        outcome = Outcome(
            success=stop.success,
            error_message=str(stop),
            stop_reason=stop.stop_reason,
            error_class=None if stop.success else "permanent",  # a limit: the same next time
        )
    except TimeoutError:
        # The job's own timeout (a provider's request timeout is the SDK's exception, below).
        outcome = Outcome(
            success=False,
            error_message=f"timed out after {timeout_ms} ms",
            stop_reason="timeout",
            error_class="permanent",
        )
    except asyncio.CancelledError:
        outcome = Outcome(
            success=False,
            error_message="cancelled",
            stop_reason="cancelled",
            error_class="permanent",
        )
    except Exception as exc:
        error_class, retry_after = classify(exc)
        log.info("job %s failed (%s): %s: %s", payload.job_id, error_class, type(exc).__name__, exc)
        outcome = Outcome(
            success=False,
            error_message=f"{type(exc).__name__}: {exc}",
            stop_reason="error",
            error_class=error_class,
            retry_after_ms=retry_after,
        )
    duration_ms = (time.perf_counter() - started) * 1000
    result = result_frame(offer.id, ctx.calls, outcome, duration_ms, max_output_bytes)
    await emit(result)
    return result

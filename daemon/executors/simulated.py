"""The simulated provider: deterministic token usage with prompt caching, for demos and load.

Spec fields (all optional): ``prompt`` (str), ``turns`` (calls to make, default 2),
``promptTokens`` (uncached input per call, default from the prompt), ``cachePrefixTokens``
(a cacheable prefix: written on the first call, read on the later ones; 0 = cache-hostile),
``outputTokens`` (per call, default 200), ``reasoningTokens`` (per call, inside output),
``latencyMs`` (per call, default 0), ``fail`` (true: raise after the calls, or an integer:
raise before that call index), ``tools`` (answered after every call but the last),
``outputSchema`` (the answer is then a JSON object). The spec is
:class:`shared.specs.SimulatedSpec`; the answer is deterministic (a digest of the prompt).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from daemon.executors.base import JobContext, LLMCall, Outcome, sleep_ms
from daemon.executors.loop import check_tools
from shared.specs import SimulatedSpec, SpecError, decode
from shared.usage import Usage

# USD per million tokens: input, output; cache read 0.1x and cache write 1.25x of input.
PRICES = {
    "sim-small": (0.25, 1.25),
    "sim-large": (3.0, 15.0),
    "sim-reasoner": (1.1, 4.4),
}
DEFAULT_MODEL = "sim-small"


class SimulatedFailure(RuntimeError):
    """The failure a spec asked for."""


def price(model: str, usage: Usage) -> float | None:
    """Cost of a call at the simulated prices; None for an unknown model."""
    if model not in PRICES:
        return None
    inp, out = PRICES[model]
    return (
        (usage.input or 0) * inp
        + (usage.cache_read or 0) * inp * 0.1
        + (usage.cache_creation or 0) * inp * 1.25
        + (usage.output or 0) * out
    ) / 1_000_000


def sim_rates(model: str) -> tuple[float, float] | None:
    """Per-token (worst input, output) rates at the simulated prices; None if unknown."""
    if model not in PRICES:
        return None
    inp, out = PRICES[model]
    return inp * 1.25 / 1_000_000, out / 1_000_000


def answer(prompt: str, turns: int, schema: object) -> str | dict[str, Any]:
    """The simulated agent's deterministic answer (a JSON object when a schema is asked for)."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:12]
    if isinstance(schema, dict):
        return {"answer": f"simulated-{digest}", "calls": turns}
    return f"Simulated answer {digest} after {turns} calls."


class SimulatedExecutor:
    """Makes ``turns`` simulated calls, each reported with exact usage and a provider cost."""

    name = "simulated"

    def __init__(self, models: list[str] | None = None) -> None:
        self.models = models or []

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec's fields before accepting the offer."""
        check_tools(decode(SimulatedSpec, spec).tools)

    async def run(self, ctx: JobContext) -> Outcome:
        """Make the calls; stop early when the context says a limit is reached."""
        spec, model = decode(SimulatedSpec, ctx.spec), ctx.model or DEFAULT_MODEL
        digest = int(hashlib.sha256(spec.prompt.encode()).hexdigest()[:8], 16)
        turns = spec.turns
        prompt_tokens = (
            spec.prompt_tokens if isinstance(spec.prompt_tokens, int) else 50 + digest % 400
        )
        prefix = spec.cache_prefix_tokens
        output_default = (
            spec.output_tokens if isinstance(spec.output_tokens, int) else 100 + digest % 200
        )
        reasoning = spec.reasoning_tokens
        fail = spec.fail
        rates = sim_rates(model)
        for turn in range(turns):
            if fail is not True and fail is not False and turn == fail:
                raise SimulatedFailure(f"simulated failure before call {turn}")
            # The simulated provider knows each call's input exactly: the plan is exact.
            planned_input = prompt_tokens + turn * 20 + prefix
            output = ctx.plan_call(rates, planned_input, output_default + turn * 7)
            started = time.perf_counter()
            await sleep_ms(spec.latency_ms)
            usage = Usage(
                input=prompt_tokens + turn * 20,
                output=output,
                cache_read=prefix if (prefix and turn > 0) else 0,
                cache_creation=prefix if (prefix and turn == 0) else 0,
                reasoning=min(reasoning, output) if reasoning else None,
            )
            cost = price(model, usage)
            await ctx.record(
                LLMCall(
                    provider="simulated",
                    request_model=model,
                    response_model=model,
                    usage=usage,
                    finish_reason="tool_use" if turn < turns - 1 else "end_turn",
                    cost_usd=cost,
                    cost_source="provider" if cost is not None else "unpriced",
                    duration_ms=(time.perf_counter() - started) * 1000,
                    request_id=f"sim-{ctx.execution_id[:8]}-{turn}",
                )
            )
            if turn < turns - 1:
                for name in spec.tools:  # every turn but the last asks for each tool once
                    await ctx.run_tool(name, {"turn": turn}, spec.tools)
        if fail is True:
            raise SimulatedFailure("simulated failure after the last call")
        return Outcome(output=answer(spec.prompt, turns, spec.output_schema))


def create(config: dict[str, Any]) -> SimulatedExecutor:
    """Build from ``--executor simulated[={"models": [...]}]``."""
    models = config.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise SpecError("simulated: config.models must be a list of strings")
    return SimulatedExecutor(models)

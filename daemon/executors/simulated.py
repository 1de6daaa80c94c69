"""The simulated provider: deterministic token usage with prompt caching, for demos and load.

Spec fields (all optional): ``prompt`` (str), ``turns`` (calls to make, default 2),
``promptTokens`` (uncached input per call, default from the prompt), ``cachePrefixTokens``
(a cacheable prefix: written on the first call, read on the later ones; 0 = cache-hostile),
``outputTokens`` (per call, default 200), ``reasoningTokens`` (per call, inside output),
``latencyMs`` (per call, default 0), ``fail`` (true: raise after the calls, or an integer:
raise before that call index).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from daemon.executors.base import JobContext, LLMCall, Outcome, SpecError, sleep_ms
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


def _int(spec: dict[str, Any], key: str, default: int) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"spec.{key} must be an integer >= 0, got {value!r}")
    return value


class SimulatedExecutor:
    """Makes ``turns`` simulated calls, each reported with exact usage and a provider cost."""

    name = "simulated"

    def __init__(self, models: list[str] | None = None) -> None:
        self.models = models or []

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec's fields before accepting the offer."""
        for key, default in (
            ("turns", 2),
            ("promptTokens", 0),
            ("cachePrefixTokens", 0),
            ("outputTokens", 0),
            ("reasoningTokens", 0),
            ("latencyMs", 0),
        ):
            _int(spec, key, default)
        if "prompt" in spec and not isinstance(spec["prompt"], str):
            raise SpecError("spec.prompt must be a string")
        if "fail" in spec and not isinstance(spec["fail"], bool | int):
            raise SpecError("spec.fail must be a boolean or a call index")

    async def run(self, ctx: JobContext) -> Outcome:
        """Make the calls; stop early when the context says a limit is reached."""
        spec, model = ctx.spec, ctx.model or DEFAULT_MODEL
        prompt = str(spec.get("prompt", "hello"))
        digest = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        turns = _int(spec, "turns", 2)
        prompt_tokens = _int(spec, "promptTokens", 50 + digest % 400)
        prefix = _int(spec, "cachePrefixTokens", 0)
        output_default = _int(spec, "outputTokens", 100 + digest % 200)
        reasoning = _int(spec, "reasoningTokens", 0)
        latency = _int(spec, "latencyMs", 0)
        fail = spec.get("fail", False)
        rates = sim_rates(model)
        for turn in range(turns):
            if fail is not True and fail is not False and turn == fail:
                raise SimulatedFailure(f"simulated failure before call {turn}")
            # The simulated provider knows each call's input exactly: the plan is exact.
            planned_input = prompt_tokens + turn * 20 + prefix
            output = ctx.plan_call(rates, planned_input, output_default + turn * 7)
            started = time.perf_counter()
            await sleep_ms(latency)
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
        if fail is True:
            raise SimulatedFailure("simulated failure after the last call")
        return Outcome(success=True, stop_reason="end_turn")


def create(config: dict[str, Any]) -> SimulatedExecutor:
    """Build from ``--executor simulated[={"models": [...]}]``."""
    models = config.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise SpecError("simulated: config.models must be a list of strings")
    return SimulatedExecutor(models)

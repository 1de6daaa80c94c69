"""OpenAI executor (official ``openai`` SDK): Chat Completions or the Responses API.

Spec: ``prompt`` (str) or ``messages`` (Chat Completions list), ``system`` (str),
``api`` (``chat`` default, or ``responses``), ``stream`` (bool; Chat Completions streams ask
for ``stream_options.include_usage`` and take the final usage chunk), ``maxTokens``,
``reasoningEffort`` (reasoning models).

OpenAI reports input *including* cached tokens and output *including* reasoning: input is
converted to Tally's convention (cached subtracted), reasoning kept as the subset it is.
"""

from __future__ import annotations

import os
import time
from typing import Any

from daemon.executors.base import (
    JobContext,
    LLMCall,
    Outcome,
    SpecError,
    StreamCutError,
    estimate_tokens,
)
from shared.usage import Usage

UNCAPPED = 10**9
PROVIDER = "openai"


def _detail(obj: Any, name: str, field: str) -> int | None:
    details = getattr(obj, name, None)
    value = getattr(details, field, None) if details is not None else None
    return value if isinstance(value, int) else None


def chat_usage(usage: Any) -> Usage:
    """Chat Completions ``usage`` -> Tally buckets."""
    if usage is None:
        return Usage()
    return Usage.from_openai(
        prompt_tokens=getattr(usage, "prompt_tokens", None),
        completion_tokens=getattr(usage, "completion_tokens", None),
        cached_tokens=_detail(usage, "prompt_tokens_details", "cached_tokens"),
        reasoning_tokens=_detail(usage, "completion_tokens_details", "reasoning_tokens"),
    )


def responses_usage(usage: Any) -> Usage:
    """Responses API ``usage`` -> Tally buckets."""
    if usage is None:
        return Usage()
    return Usage.from_openai(
        prompt_tokens=getattr(usage, "input_tokens", None),
        completion_tokens=getattr(usage, "output_tokens", None),
        cached_tokens=_detail(usage, "input_tokens_details", "cached_tokens"),
        reasoning_tokens=_detail(usage, "output_tokens_details", "reasoning_tokens"),
    )


class OpenAIExecutor:
    """One call per job (the conversation in the spec), on either API."""

    name = "openai"

    def __init__(self, config: dict[str, Any]) -> None:
        import openai

        self.models: list[str] = list(config.get("models", []))
        self.default_model = str(config.get("model", "gpt-4.1-mini"))
        # An OpenAI-compatible local server (Ollama's /v1, vLLM, ...): cost 0, "local".
        self.local = bool(config.get("local", False))
        self.client = openai.AsyncOpenAI(
            api_key=config.get("api_key") or os.environ.get("OPENAI_API_KEY") or "unset",
            base_url=config.get("base_url") or os.environ.get("OPENAI_BASE_URL"),
            max_retries=int(config.get("max_retries", 3)),
            timeout=float(config.get("timeout", 600)),
        )

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec before accepting the offer."""
        if not isinstance(spec.get("prompt"), str) and not isinstance(spec.get("messages"), list):
            raise SpecError("spec.prompt (string) or spec.messages (list) is required")
        if spec.get("api", "chat") not in ("chat", "responses"):
            raise SpecError("spec.api must be 'chat' or 'responses'")

    def _messages(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if isinstance(spec.get("system"), str):
            messages.append({"role": "system", "content": spec["system"]})
        if isinstance(spec.get("messages"), list):
            messages.extend(spec["messages"])
        else:
            messages.append({"role": "user", "content": spec["prompt"]})
        return messages

    async def _chat(
        self, ctx: JobContext, model: str, cap: int | None
    ) -> tuple[Usage, str | None, str, str]:
        spec = ctx.spec
        kwargs: dict[str, Any] = {"model": model, "messages": self._messages(spec)}
        if cap is not None:
            kwargs["max_completion_tokens"] = cap
        if spec.get("reasoningEffort"):
            kwargs["reasoning_effort"] = spec["reasoningEffort"]
        if not spec.get("stream"):
            completion = await self.client.chat.completions.create(**kwargs)
            reason = completion.choices[0].finish_reason if completion.choices else None
            return chat_usage(completion.usage), reason, completion.model, completion.id
        stream = await self.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        usage_chunk: Any = None
        finish: str | None = None
        response_model, response_id = model, ""
        async for chunk in stream:
            response_model, response_id = chunk.model or response_model, chunk.id
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage_chunk = chunk.usage  # the final running totals, never a sum of deltas
        if usage_chunk is None:
            raise StreamCutError("the stream ended before its usage chunk")
        return chat_usage(usage_chunk), finish, response_model, response_id

    async def _responses(
        self, ctx: JobContext, model: str, cap: int | None
    ) -> tuple[Usage, str | None, str, str]:
        spec = ctx.spec
        kwargs: dict[str, Any] = {"model": model, "input": self._messages(spec)}
        if cap is not None:
            kwargs["max_output_tokens"] = cap
        if spec.get("reasoningEffort"):
            kwargs["reasoning"] = {"effort": spec["reasoningEffort"]}
        response = await self.client.responses.create(**kwargs)
        return responses_usage(response.usage), response.status, response.model, response.id

    async def run(self, ctx: JobContext) -> Outcome:
        """Make the call and report it."""
        model = ctx.model or self.default_model
        rates = ((0.0, 0.0) if self.local else ctx.rates(PROVIDER, model)) if ctx.budgeted else None
        wanted = int(ctx.spec.get("maxTokens") or 0)
        cap: int | None = ctx.plan_call(
            rates, estimate_tokens(self._messages(ctx.spec)), wanted or UNCAPPED
        )
        if cap == UNCAPPED and not wanted:
            cap = None  # no limit asked for and none needed: the provider's default
        started = time.perf_counter()
        call = self._responses if ctx.spec.get("api") == "responses" else self._chat
        try:
            usage, finish, response_model, request_id = await call(ctx, model, cap)
        except StreamCutError:
            await ctx.record(
                LLMCall(
                    PROVIDER,
                    model,
                    None,
                    Usage(),
                    tokens_unavailable=True,
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
            )
            raise
        cost, source = (0.0, "local") if self.local else ctx.price(PROVIDER, response_model, usage)
        await ctx.record(
            LLMCall(
                provider=PROVIDER,
                request_model=model,
                response_model=response_model,
                usage=usage,
                finish_reason=finish,
                cost_usd=cost,
                cost_source=source,
                duration_ms=(time.perf_counter() - started) * 1000,
                request_id=request_id,
                tokens_unavailable=usage.is_unknown,
            )
        )
        if finish == "length":
            return Outcome(stop_reason="max_output_tokens")
        return Outcome()


def create(config: dict[str, Any]) -> OpenAIExecutor:
    """Build from ``--executor openai[={"base_url": ..., "models": [...]}]``."""
    return OpenAIExecutor(config)

"""Anthropic Messages API executor (official ``anthropic`` SDK), with an agent loop.

Spec: ``prompt`` (str) or ``messages`` (Messages API list), ``system`` (str),
``cacheSystem`` (bool: put ``cache_control`` on the system prompt), ``maxTokens`` (default
1024), ``stream`` (bool), ``thinkingBudgetTokens`` (extended thinking), ``tools`` (names of
tools the daemon registers; the loop continues while the model asks for them),
``outputSchema`` (a JSON schema: asked for in the system prompt, the answer parsed as JSON).
The spec is :class:`shared.specs.AnthropicSpec`.

Usage is Anthropic's own convention (input excludes cache reads and writes): passed through.
A streamed call takes the final message's totals, never a sum of deltas.
"""

from __future__ import annotations

import os
import time
from typing import Any

from daemon.executors.base import (
    JobContext,
    LLMCall,
    Outcome,
    StreamCutError,
    estimate_tokens,
)
from daemon.executors.loop import (
    ToolCall,
    Turn,
    agent_loop,
    arguments_of,
    check_tools,
    schema_instruction,
)
from daemon.tools import declarations
from shared.specs import AnthropicSpec, decode
from shared.usage import Usage

PROVIDER = "anthropic"


def one_hour_writes(usage: Any) -> int | None:
    """The 1-hour part of the cache writes (``usage.cache_creation.ephemeral_1h_input_tokens``),
    None when the response does not split them."""
    split = getattr(usage, "cache_creation", None)
    value = getattr(split, "ephemeral_1h_input_tokens", None)
    return value if isinstance(value, int) else None


def usage_of(usage: Any) -> Usage:
    """Anthropic ``usage`` -> Tally buckets (pass through; absent stays unknown)."""
    if usage is None:
        return Usage()
    return Usage.from_anthropic(
        getattr(usage, "input_tokens", None),
        getattr(usage, "output_tokens", None),
        getattr(usage, "cache_read_input_tokens", None),
        getattr(usage, "cache_creation_input_tokens", None),
    )


class AnthropicExecutor:
    """Runs a conversation, answering tool calls, until the model ends its turn."""

    name = "anthropic"

    def __init__(self, config: dict[str, Any]) -> None:
        import anthropic

        self.models: list[str] = list(config.get("models", []))
        self.default_model = str(config.get("model", "claude-sonnet-4-6"))
        self.client = anthropic.AsyncAnthropic(
            api_key=config.get("api_key") or os.environ.get("ANTHROPIC_API_KEY") or "unset",
            base_url=config.get("base_url") or os.environ.get("ANTHROPIC_BASE_URL"),
            max_retries=int(config.get("max_retries", 3)),
            timeout=float(config.get("timeout", 600)),
        )

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec before accepting the offer."""
        typed = decode(AnthropicSpec, spec)
        check_tools(typed.tools)

    def _request(
        self, ctx: JobContext, spec: AnthropicSpec, messages: list[dict[str, Any]]
    ) -> dict[str, Any]:
        wanted = spec.max_tokens if isinstance(spec.max_tokens, int) else 1024
        request: dict[str, Any] = {
            "model": ctx.model or self.default_model,
            "max_tokens": min(wanted, ctx.remaining_output_tokens(wanted)),
            "messages": messages,
        }
        system = spec.system if isinstance(spec.system, str) else None
        if isinstance(spec.output_schema, dict):
            # The Messages API has no JSON mode: the schema is asked for in the system prompt,
            # and the answer is parsed (a non-object answer fails the job).
            system = (system + "\n\n" if system else "") + schema_instruction(spec.output_schema)
        if system is not None:
            block: dict[str, Any] = {"type": "text", "text": system}
            if spec.cache_system:
                block["cache_control"] = {"type": "ephemeral"}
            request["system"] = [block]
        if isinstance(spec.thinking_budget_tokens, int) and spec.thinking_budget_tokens > 0:
            request["thinking"] = {"type": "enabled", "budget_tokens": spec.thinking_budget_tokens}
        if spec.tools:
            request["tools"] = [
                {"name": d.name, "description": d.description, "input_schema": d.parameters}
                for d in declarations(spec.tools)
            ]
        return request

    async def _call(self, ctx: JobContext, request: dict[str, Any], stream: bool) -> Any:
        started = time.perf_counter()
        if stream:
            async with self.client.messages.stream(**request) as events:
                message = await events.get_final_message()
        else:
            message = await self.client.messages.create(**request)
        usage = usage_of(getattr(message, "usage", None))
        cut = message.stop_reason is None
        if cut:
            # The stream ended before message_delta/message_stop: input counts (from
            # message_start) are final, the output count is not. Keep what is known.
            usage = Usage(usage.input, None, usage.cache_read, usage.cache_creation)
        one_hour = one_hour_writes(getattr(message, "usage", None))
        cost, source = (
            ctx.price(PROVIDER, message.model or request["model"], usage, one_hour)
            if not cut
            else (None, "unpriced")
        )
        await ctx.record(
            LLMCall(
                provider=PROVIDER,
                request_model=request["model"],
                response_model=message.model,
                usage=usage,
                finish_reason=message.stop_reason,
                cost_usd=cost,
                cost_source=source,
                duration_ms=(time.perf_counter() - started) * 1000,
                request_id=getattr(message, "_request_id", None) or message.id,
                tokens_unavailable=usage.is_unknown,
                cache_creation_1h=one_hour,
            )
        )
        if cut:
            raise StreamCutError("the stream ended before its final usage (message_stop)")
        return message

    async def run(self, ctx: JobContext) -> Outcome:
        """The agent loop: call, answer tools, repeat until the model stops asking."""
        spec = decode(AnthropicSpec, ctx.spec)
        messages: list[dict[str, Any]] = (
            list(spec.messages)
            if isinstance(spec.messages, list)
            else [{"role": "user", "content": spec.prompt}]
        )
        rates = ctx.rates(PROVIDER, ctx.model or self.default_model) if ctx.budgeted else None

        async def step() -> Turn:
            request = self._request(ctx, spec, messages)
            content = {k: request[k] for k in ("system", "messages", "tools") if k in request}
            request["max_tokens"] = ctx.plan_call(
                rates, estimate_tokens(content), request["max_tokens"]
            )
            message = await self._call(ctx, request, spec.stream)
            text = "".join(b.text for b in message.content if b.type == "text")
            calls = [
                ToolCall(b.id, b.name, arguments_of(b.input))
                for b in message.content
                if b.type == "tool_use"
            ]
            if message.stop_reason != "tool_use":
                calls = []
            return Turn(text, calls, message.stop_reason == "max_tokens", message)

        def follow_up(turn: Turn, answers: list[tuple[ToolCall, str]]) -> None:
            blocks = [b.model_dump(exclude_none=True) for b in turn.raw.content]
            messages.append({"role": "assistant", "content": blocks})
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": call.id, "content": text}
                        for call, text in answers
                    ],
                }
            )

        return await agent_loop(ctx, spec.tools, spec.output_schema, step, follow_up)


def create(config: dict[str, Any]) -> AnthropicExecutor:
    """Build from ``--executor anthropic[={"base_url": ..., "models": [...]}]``."""
    return AnthropicExecutor(config)

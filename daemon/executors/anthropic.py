"""Anthropic Messages API executor (official ``anthropic`` SDK), with an agent loop.

Spec: ``prompt`` (str) or ``messages`` (Messages API list), ``system`` (str),
``cacheSystem`` (bool: put ``cache_control`` on the system prompt), ``maxTokens`` (default
1024), ``stream`` (bool), ``thinkingBudgetTokens`` (extended thinking), ``tools`` (names of
tools the daemon registers; the loop continues while the model asks for them).

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
    SpecError,
    StreamCutError,
    estimate_tokens,
)
from daemon.tools import registered
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
        self.tools = registered()

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec before accepting the offer."""
        if not isinstance(spec.get("prompt"), str) and not isinstance(spec.get("messages"), list):
            raise SpecError("spec.prompt (string) or spec.messages (list) is required")
        for name in spec.get("tools", []):
            if name not in self.tools:
                raise SpecError(f"spec.tools: no tool {name!r} on this daemon")

    def _request(self, ctx: JobContext, messages: list[dict[str, Any]]) -> dict[str, Any]:
        spec = ctx.spec
        request: dict[str, Any] = {
            "model": ctx.model or self.default_model,
            "max_tokens": min(
                int(spec.get("maxTokens", 1024)),
                ctx.remaining_output_tokens(int(spec.get("maxTokens", 1024))),
            ),
            "messages": messages,
        }
        if isinstance(spec.get("system"), str):
            block: dict[str, Any] = {"type": "text", "text": spec["system"]}
            if spec.get("cacheSystem"):
                block["cache_control"] = {"type": "ephemeral"}
            request["system"] = [block]
        if spec.get("thinkingBudgetTokens"):
            request["thinking"] = {
                "type": "enabled",
                "budget_tokens": int(spec["thinkingBudgetTokens"]),
            }
        if spec.get("tools"):
            request["tools"] = [
                {
                    "name": n,
                    "description": self.tools[n][1].get("description", ""),
                    "input_schema": {
                        k: v for k, v in self.tools[n][1].items() if k != "description"
                    },
                }
                for n in spec["tools"]
            ]
        return request

    async def _call(self, ctx: JobContext, request: dict[str, Any]) -> Any:
        started = time.perf_counter()
        if ctx.spec.get("stream"):
            async with self.client.messages.stream(**request) as stream:
                message = await stream.get_final_message()
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
            ctx.price(PROVIDER, message.model, usage, one_hour) if not cut else (None, "unpriced")
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
        spec = ctx.spec
        messages: list[dict[str, Any]] = (
            list(spec["messages"])
            if isinstance(spec.get("messages"), list)
            else [{"role": "user", "content": spec["prompt"]}]
        )
        rates = ctx.rates(PROVIDER, ctx.model or self.default_model) if ctx.budgeted else None
        while True:
            request = self._request(ctx, messages)
            content = {k: request[k] for k in ("system", "messages", "tools") if k in request}
            request["max_tokens"] = ctx.plan_call(
                rates, estimate_tokens(content), request["max_tokens"]
            )
            message = await self._call(ctx, request)
            if message.stop_reason != "tool_use":
                if message.stop_reason == "max_tokens":
                    return Outcome(stop_reason="max_output_tokens")
                return Outcome()
            messages.append(
                {
                    "role": "assistant",
                    "content": [b.model_dump(exclude_none=True) for b in message.content],
                }
            )
            results = []
            for block in message.content:
                if block.type == "tool_use":
                    tool, _schema = self.tools[block.name]
                    results.append(
                        {
                            "type": "tool_result",
                            "tool_use_id": block.id,
                            "content": tool(dict(block.input or {})),
                        }
                    )
            messages.append({"role": "user", "content": results})


def create(config: dict[str, Any]) -> AnthropicExecutor:
    """Build from ``--executor anthropic[={"base_url": ..., "models": [...]}]``."""
    return AnthropicExecutor(config)

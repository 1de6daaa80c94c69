"""Ollama executor (official ``ollama`` SDK, native chat API). Local models: cost 0, ``local``.

Spec: ``prompt`` (str) or ``messages`` (list), ``system`` (str), ``stream`` (bool),
``maxTokens`` (``num_predict``), ``tools`` (answered in a loop), ``outputSchema`` (the
``format`` of the request). The spec is :class:`shared.specs.OllamaSpec`. Usage comes from
``prompt_eval_count`` (input) and ``eval_count`` (output) of the final response (for a
stream, the ``done`` chunk); durations are nanoseconds. Ollama does not report prompt-cache
hits, so the cache buckets stay unknown.
"""

from __future__ import annotations

import os
import time
from typing import Any

from daemon.executors.base import JobContext, LLMCall, Outcome, StreamCutError
from daemon.executors.loop import ToolCall, Turn, agent_loop, arguments_of, check_tools
from daemon.tools import function_tools
from shared.specs import OllamaSpec, decode
from shared.usage import Usage

PROVIDER = "ollama"


def usage_of(response: Any) -> Usage:
    """Final response counts -> Tally buckets (absent counts stay unknown)."""
    prompt = getattr(response, "prompt_eval_count", None)
    output = getattr(response, "eval_count", None)
    return Usage(
        input=prompt if isinstance(prompt, int) else None,
        output=output if isinstance(output, int) else None,
    )


class OllamaExecutor:
    """An agent loop on the chat API, answering tool calls."""

    name = "ollama"

    def __init__(self, config: dict[str, Any]) -> None:
        import ollama

        self.models: list[str] = list(config.get("models", []))
        self.default_model = str(config.get("model", "llama3.2"))
        self.client = ollama.AsyncClient(
            host=config.get("base_url") or os.environ.get("OLLAMA_HOST"),
            timeout=float(config.get("timeout", 600)),
        )

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec before accepting the offer."""
        check_tools(decode(OllamaSpec, spec).tools)

    async def _chat(
        self, model: str, spec: OllamaSpec, messages: list[dict[str, Any]], options: Any
    ) -> tuple[Any, str, list[Any]]:
        """One chat call: its final response (None if a stream was cut), text and tool calls."""
        kwargs: dict[str, Any] = {"model": model, "messages": messages, "options": options}
        if spec.tools:
            kwargs["tools"] = function_tools(spec.tools)
        if isinstance(spec.output_schema, dict):
            kwargs["format"] = spec.output_schema
        if not spec.stream:
            whole = await self.client.chat(**kwargs)
            return whole, whole.message.content or "", list(whole.message.tool_calls or [])
        final: Any = None
        text: list[str] = []
        calls: list[Any] = []
        async for part in await self.client.chat(**kwargs, stream=True):
            text.append(part.message.content or "")
            calls.extend(part.message.tool_calls or [])
            if part.done:
                final = part  # its counts are the call's totals
        return final, "".join(text), calls

    async def run(self, ctx: JobContext) -> Outcome:
        """The agent loop: call, answer tool calls, repeat until the model answers."""
        spec = decode(OllamaSpec, ctx.spec)
        model = ctx.model or self.default_model
        messages: list[dict[str, Any]] = []
        if isinstance(spec.system, str):
            messages.append({"role": "system", "content": spec.system})
        messages.extend(
            spec.messages
            if isinstance(spec.messages, list)
            else [{"role": "user", "content": spec.prompt}]
        )

        async def step() -> Turn:
            # Local models cost nothing: a budget never caps them, limits on tokens still do.
            wanted = spec.max_tokens if isinstance(spec.max_tokens, int) else 10**9
            cap = ctx.plan_call((0.0, 0.0), 0, wanted)
            options = {"num_predict": cap} if isinstance(spec.max_tokens, int) else None
            started = time.perf_counter()
            final, text, calls = await self._chat(model, spec, messages, options)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if final is None:
                await ctx.record(
                    LLMCall(
                        PROVIDER,
                        model,
                        None,
                        Usage(),
                        duration_ms=elapsed_ms,
                        cost_usd=0.0,
                        cost_source="local",
                        tokens_unavailable=True,
                    )
                )
                raise StreamCutError("the stream ended before its done chunk")
            usage = usage_of(final)
            total_ns = getattr(final, "total_duration", None)
            await ctx.record(
                LLMCall(
                    provider=PROVIDER,
                    request_model=model,
                    response_model=final.model or model,
                    usage=usage,
                    finish_reason=final.done_reason,
                    cost_usd=0.0,
                    cost_source="local",
                    duration_ms=total_ns / 1e6 if isinstance(total_ns, int) else elapsed_ms,
                    tokens_unavailable=usage.is_unknown,
                )
            )
            tool_calls = [
                # Ollama gives tool calls no id: the position names each one.
                ToolCall(str(i), c.function.name, arguments_of(dict(c.function.arguments or {})))
                for i, c in enumerate(calls)
            ]
            return Turn(text, tool_calls, final.done_reason == "length", calls)

        def follow_up(turn: Turn, answers: list[tuple[ToolCall, str]]) -> None:
            messages.append(
                {
                    "role": "assistant",
                    "content": turn.text,
                    "tool_calls": [c.model_dump(exclude_none=True) for c in turn.raw],
                }
            )
            messages.extend(
                {"role": "tool", "content": text, "tool_name": call.name} for call, text in answers
            )

        return await agent_loop(ctx, spec.tools, spec.output_schema, step, follow_up)


def create(config: dict[str, Any]) -> OllamaExecutor:
    """Build from ``--executor ollama[={"base_url": "http://127.0.0.1:11434"}]``."""
    return OllamaExecutor(config)

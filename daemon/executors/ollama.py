"""Ollama executor (official ``ollama`` SDK, native chat API). Local models: cost 0, ``local``.

Spec: ``prompt`` (str) or ``messages`` (list), ``system`` (str), ``stream`` (bool),
``maxTokens`` (``num_predict``). Usage comes from ``prompt_eval_count`` (input) and
``eval_count`` (output) of the final response (for a stream, the ``done`` chunk); durations
are nanoseconds. Ollama does not report prompt-cache hits, so the cache buckets stay unknown.
"""

from __future__ import annotations

import os
import time
from typing import Any

from daemon.executors.base import JobContext, LLMCall, Outcome, SpecError, StreamCutError
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
    """One chat call per job."""

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
        if not isinstance(spec.get("prompt"), str) and not isinstance(spec.get("messages"), list):
            raise SpecError("spec.prompt (string) or spec.messages (list) is required")

    async def run(self, ctx: JobContext) -> Outcome:
        """Make the call and report it."""
        spec = ctx.spec
        model = ctx.model or self.default_model
        # Local models cost nothing: a budget never caps them, limits on tokens still do.
        cap = ctx.plan_call((0.0, 0.0), 0, int(spec.get("maxTokens") or 0) or 10**9)
        messages: list[dict[str, Any]] = []
        if isinstance(spec.get("system"), str):
            messages.append({"role": "system", "content": spec["system"]})
        messages.extend(
            spec["messages"]
            if isinstance(spec.get("messages"), list)
            else [{"role": "user", "content": spec["prompt"]}]
        )
        options = {}
        if spec.get("maxTokens"):
            options["num_predict"] = cap
        started = time.perf_counter()
        final: Any = None
        if spec.get("stream"):
            async for part in await self.client.chat(
                model=model, messages=messages, stream=True, options=options or None
            ):
                if part.done:
                    final = part  # its counts are the call's totals
        else:
            final = await self.client.chat(model=model, messages=messages, options=options or None)
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
        if final.done_reason == "length":
            return Outcome(stop_reason="max_output_tokens")
        return Outcome()


def create(config: dict[str, Any]) -> OllamaExecutor:
    """Build from ``--executor ollama[={"base_url": "http://127.0.0.1:11434"}]``."""
    return OllamaExecutor(config)

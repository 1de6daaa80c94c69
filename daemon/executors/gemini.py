"""Gemini executor (official ``google-genai`` SDK).

Spec: ``prompt`` (str), ``system`` (str), ``stream`` (bool), ``maxTokens``,
``thinkingBudgetTokens``. Gemini reports the prompt *including* cached content and thinking
*outside* the candidates: input = prompt - cached, output = candidates + thoughts, and
reasoning = thoughts. A stream takes the last chunk's usage metadata (running totals).
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

PROVIDER = "google"


def usage_of(metadata: Any) -> Usage:
    """``usage_metadata`` -> Tally buckets."""
    if metadata is None:
        return Usage()
    return Usage.from_gemini(
        prompt_token_count=getattr(metadata, "prompt_token_count", None),
        candidates_token_count=getattr(metadata, "candidates_token_count", None),
        cached_content_token_count=getattr(metadata, "cached_content_token_count", None),
        thoughts_token_count=getattr(metadata, "thoughts_token_count", None),
    )


class GeminiExecutor:
    """One generate_content call per job."""

    name = "gemini"

    def __init__(self, config: dict[str, Any]) -> None:
        from google import genai
        from google.genai import types

        self.models: list[str] = list(config.get("models", []))
        self.default_model = str(config.get("model", "gemini-2.5-flash"))
        base_url = config.get("base_url") or os.environ.get("GOOGLE_GEMINI_BASE_URL")
        self.client = genai.Client(
            api_key=config.get("api_key") or os.environ.get("GEMINI_API_KEY") or "unset",
            http_options=types.HttpOptions(base_url=base_url) if base_url else None,
        )
        self.types = types

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec before accepting the offer."""
        if not isinstance(spec.get("prompt"), str):
            raise SpecError("spec.prompt (string) is required")

    async def run(self, ctx: JobContext) -> Outcome:
        """Make the call and report it."""
        spec, types = ctx.spec, self.types
        model = ctx.model or self.default_model
        rates = ctx.rates(PROVIDER, model) if ctx.budgeted else None
        wanted = int(spec.get("maxTokens") or 0)
        content = [spec.get("system"), spec["prompt"]]
        cap = ctx.plan_call(rates, estimate_tokens(content), wanted or 10**9)
        config: dict[str, Any] = {}
        if isinstance(spec.get("system"), str):
            config["system_instruction"] = spec["system"]
        if wanted or cap < 10**9:
            config["max_output_tokens"] = cap
        if spec.get("thinkingBudgetTokens"):
            config["thinking_config"] = types.ThinkingConfig(
                thinking_budget=int(spec["thinkingBudgetTokens"])
            )
        kwargs = {
            "model": model,
            "contents": spec["prompt"],
            "config": types.GenerateContentConfig(**config) if config else None,
        }
        started = time.perf_counter()
        if spec.get("stream"):
            metadata, finish, version = None, None, model
            async for chunk in await self.client.aio.models.generate_content_stream(**kwargs):
                if chunk.usage_metadata is not None:
                    metadata = chunk.usage_metadata
                if chunk.candidates and chunk.candidates[0].finish_reason:
                    finish = str(chunk.candidates[0].finish_reason.value)
                version = chunk.model_version or version
            if finish is None:
                await ctx.record(
                    LLMCall(
                        PROVIDER,
                        model,
                        None,
                        usage_of(metadata),
                        tokens_unavailable=metadata is None,
                    )
                )
                raise StreamCutError("the stream ended before its final chunk")
        else:
            response = await self.client.aio.models.generate_content(**kwargs)
            metadata = response.usage_metadata
            finish = (
                str(response.candidates[0].finish_reason.value)
                if response.candidates and response.candidates[0].finish_reason
                else None
            )
            version = response.model_version or model
        usage = usage_of(metadata)
        cost, source = ctx.price(PROVIDER, model, usage)
        await ctx.record(
            LLMCall(
                provider=PROVIDER,
                request_model=model,
                response_model=version,
                usage=usage,
                finish_reason=finish,
                cost_usd=cost,
                cost_source=source,
                duration_ms=(time.perf_counter() - started) * 1000,
                tokens_unavailable=usage.is_unknown,
            )
        )
        return Outcome(stop_reason="max_output_tokens" if finish == "MAX_TOKENS" else "end_turn")


def create(config: dict[str, Any]) -> GeminiExecutor:
    """Build from ``--executor gemini[={"base_url": ...}]``."""
    return GeminiExecutor(config)

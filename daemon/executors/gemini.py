"""Gemini executor (official ``google-genai`` SDK).

Spec: ``prompt`` (str), ``system`` (str), ``stream`` (bool), ``maxTokens``,
``thinkingBudgetTokens``, ``tools`` (function declarations answered in a loop),
``outputSchema`` (``response_json_schema`` with a JSON MIME type); the spec is
:class:`shared.specs.GeminiSpec`. Gemini reports the prompt *including* cached content and thinking
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
    StreamCutError,
    estimate_tokens,
)
from daemon.executors.loop import ToolCall, Turn, agent_loop, arguments_of, check_tools
from daemon.tools import declarations
from shared.specs import GeminiSpec, decode
from shared.usage import Usage, input_bound

PROVIDER = "google"


def usage_of(metadata: Any) -> tuple[Usage, bool, int | None]:
    """``usage_metadata`` -> Tally buckets, whether it contradicted itself (cached content
    above the prompt: the call is recorded all the same, what cannot be trusted unknown), and
    then an upper bound of its total input, counted against the job's limits in its place."""
    if metadata is None:
        return Usage(), False, None
    prompt = getattr(metadata, "prompt_token_count", None)
    cached = getattr(metadata, "cached_content_token_count", None)
    usage, inconsistent = Usage.from_gemini_checked(
        prompt_token_count=prompt,
        candidates_token_count=getattr(metadata, "candidates_token_count", None),
        cached_content_token_count=cached,
        thoughts_token_count=getattr(metadata, "thoughts_token_count", None),
    )
    return usage, inconsistent, input_bound(prompt, cached) if usage.input is None else None


class GeminiExecutor:
    """An agent loop on generate_content, answering function calls."""

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
        check_tools(decode(GeminiSpec, spec).tools)

    def _config(self, spec: GeminiSpec, cap: int) -> Any:
        types = self.types
        config: dict[str, Any] = {}
        if isinstance(spec.system, str):
            config["system_instruction"] = spec.system
        if isinstance(spec.max_tokens, int) or cap < 10**9:
            config["max_output_tokens"] = cap
        if isinstance(spec.thinking_budget_tokens, int):
            config["thinking_config"] = types.ThinkingConfig(
                thinking_budget=spec.thinking_budget_tokens
            )
        if spec.tools:
            config["tools"] = [
                types.Tool(
                    function_declarations=[
                        types.FunctionDeclaration(
                            name=d.name,
                            description=d.description,
                            parameters_json_schema=d.parameters,
                        )
                        for d in declarations(spec.tools)
                    ]
                )
            ]
        if isinstance(spec.output_schema, dict):
            config["response_mime_type"] = "application/json"
            config["response_json_schema"] = spec.output_schema
        return types.GenerateContentConfig(**config) if config else None

    async def _generate(
        self, kwargs: dict[str, Any], stream: bool
    ) -> tuple[Any, str | None, str, list[Any]]:
        """One call: (usage metadata, finish reason, model version, the parts answered)."""
        if not stream:
            response = await self.client.aio.models.generate_content(**kwargs)
            candidate = response.candidates[0] if response.candidates else None
            finish = (
                str(candidate.finish_reason.value)
                if candidate is not None and candidate.finish_reason
                else None
            )
            parts = list(candidate.content.parts or []) if candidate and candidate.content else []
            return response.usage_metadata, finish, response.model_version or kwargs["model"], parts
        metadata, finish, version = None, None, kwargs["model"]
        parts = []
        async for chunk in await self.client.aio.models.generate_content_stream(**kwargs):
            if chunk.usage_metadata is not None:
                metadata = chunk.usage_metadata  # running totals: the last one is the call's
            if chunk.candidates:
                candidate = chunk.candidates[0]
                if candidate.finish_reason:
                    finish = str(candidate.finish_reason.value)
                if candidate.content is not None:
                    parts.extend(candidate.content.parts or [])
            version = chunk.model_version or version
        return metadata, finish, version, parts

    async def run(self, ctx: JobContext) -> Outcome:
        """The agent loop: call, answer function calls, repeat until the model answers."""
        spec, types = decode(GeminiSpec, ctx.spec), self.types
        model = ctx.model or self.default_model
        rates = ctx.rates(PROVIDER, model) if ctx.budgeted else None
        wanted = spec.max_tokens if isinstance(spec.max_tokens, int) else 10**9
        contents: list[Any] = [types.Content(role="user", parts=[types.Part(text=spec.prompt)])]

        async def step() -> Turn:
            estimate = estimate_tokens([spec.system, [c.model_dump_json() for c in contents]])
            cap = ctx.plan_call(rates, estimate, wanted)
            kwargs = {"model": model, "contents": contents, "config": self._config(spec, cap)}
            started = time.perf_counter()
            metadata, finish, version, parts = await self._generate(kwargs, spec.stream)
            if spec.stream and finish is None:
                partial, inconsistent, bound = usage_of(metadata)
                await ctx.record(
                    LLMCall(
                        PROVIDER,
                        model,
                        None,
                        partial,
                        tokens_unavailable=metadata is None,
                        usage_inconsistent=inconsistent,
                        input_bound=bound,
                    )
                )
                raise StreamCutError("the stream ended before its final chunk")
            usage, inconsistent, bound = usage_of(metadata)
            # A price of a usage that contradicted itself would be a guess: unknown.
            cost, source = (None, "unpriced") if inconsistent else ctx.price(PROVIDER, model, usage)
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
                    usage_inconsistent=inconsistent,
                    input_bound=bound,
                )
            )
            calls = [
                ToolCall(
                    part.function_call.id or str(i),
                    part.function_call.name or "",
                    arguments_of(dict(part.function_call.args or {})),
                )
                for i, part in enumerate(parts)
                if part.function_call is not None
            ]
            text = "".join(p.text for p in parts if p.text and not p.thought)
            return Turn(text, calls, finish == "MAX_TOKENS", parts)

        def follow_up(turn: Turn, answers: list[tuple[ToolCall, str]]) -> None:
            contents.append(types.Content(role="model", parts=turn.raw))
            contents.append(
                types.Content(
                    role="user",
                    parts=[
                        types.Part(
                            function_response=types.FunctionResponse(
                                id=call.id, name=call.name, response={"result": text}
                            )
                        )
                        for call, text in answers
                    ],
                )
            )

        return await agent_loop(ctx, spec.tools, spec.output_schema, step, follow_up)


def create(config: dict[str, Any]) -> GeminiExecutor:
    """Build from ``--executor gemini[={"base_url": ...}]``."""
    return GeminiExecutor(config)

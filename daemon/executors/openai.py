"""OpenAI executor (official ``openai`` SDK): Chat Completions or the Responses API.

Spec: ``prompt`` (str) or ``messages`` (Chat Completions list), ``system`` (str),
``api`` (``chat`` default, or ``responses``), ``stream`` (bool; Chat Completions streams ask
for ``stream_options.include_usage`` and take the final usage chunk: a stream that finished
without one, from a server that ignores the option, is a whole answer with its tokens unknown,
and only one cut before its ``finish_reason`` is a :class:`StreamCutError`; Responses streams
take the response of ``response.completed``), ``maxTokens``, ``reasoningEffort`` (reasoning
models), ``tools`` (function tools the daemon answers, in a loop), ``outputSchema`` (a JSON
schema: ``response_format`` / ``text.format`` of type ``json_schema``). The spec is
:class:`shared.specs.OpenAISpec`.

OpenAI reports input *including* cached tokens and output *including* reasoning: input is
converted to Tally's convention (cached subtracted), reasoning kept as the subset it is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from daemon.executors.base import (
    JobContext,
    LLMCall,
    Outcome,
    StreamCutError,
    estimate_tokens,
)
from daemon.executors.loop import ToolCall, Turn, agent_loop, arguments_of, check_tools
from daemon.tools import declarations, function_tools
from shared.specs import OpenAISpec, decode
from shared.usage import Usage, input_bound

UNCAPPED = 10**9
PROVIDER = "openai"


def _detail(obj: Any, name: str, field: str) -> int | None:
    details = getattr(obj, name, None)
    value = getattr(details, field, None) if details is not None else None
    return value if isinstance(value, int) else None


# A provider's usage in Tally's buckets, whether it contradicted itself, and an upper bound of
# its total input when its split is unknown (counted against the job's limits in its place).
Reported = tuple[Usage, bool, int | None]


def _reported(prompt: Any, completion: Any, cached: Any, reasoning: Any) -> Reported:
    usage, inconsistent = Usage.from_openai_checked(prompt, completion, cached, reasoning)
    bound = input_bound(prompt, cached) if usage.input is None else None
    return usage, inconsistent, bound


def chat_usage(usage: Any) -> Reported:
    """Chat Completions ``usage`` -> Tally buckets, and whether it contradicted itself (some
    OpenAI-compatible servers report more cached than prompt tokens): the call is recorded
    all the same, what cannot be trusted unknown."""
    if usage is None:
        return Usage(), False, None
    return _reported(
        getattr(usage, "prompt_tokens", None),
        getattr(usage, "completion_tokens", None),
        _detail(usage, "prompt_tokens_details", "cached_tokens"),
        _detail(usage, "completion_tokens_details", "reasoning_tokens"),
    )


def responses_usage(usage: Any) -> Reported:
    """Responses API ``usage`` -> Tally buckets, and whether it contradicted itself."""
    if usage is None:
        return Usage(), False, None
    return _reported(
        getattr(usage, "input_tokens", None),
        getattr(usage, "output_tokens", None),
        _detail(usage, "input_tokens_details", "cached_tokens"),
        _detail(usage, "output_tokens_details", "reasoning_tokens"),
    )


@dataclass(slots=True)
class _Answer:
    """One call's answer, whichever API made it."""

    usage: Reported
    finish: str | None
    model: str
    request_id: str
    turn: Turn


class _ChatStream:
    """Assembles a streamed Chat Completions answer: text, tool calls by index, usage."""

    def __init__(self, model: str) -> None:
        self.model, self.id = model, ""
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: Any = None

    def add(self, chunk: Any) -> None:
        self.model, self.id = chunk.model or self.model, chunk.id
        if chunk.usage is not None:
            self.usage = chunk.usage  # the final running totals, never a sum of deltas
        if not chunk.choices:
            return
        choice = chunk.choices[0]
        if choice.finish_reason:
            self.finish = choice.finish_reason
        delta = choice.delta
        if delta is None:
            return
        if delta.content:
            self.text.append(delta.content)
        for part in delta.tool_calls or []:
            call = self.calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            if part.function is not None:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""


class OpenAIExecutor:
    """An agent loop on Chat Completions or the Responses API, answering function calls."""

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
        check_tools(decode(OpenAISpec, spec).tools)

    @staticmethod
    def _messages(spec: OpenAISpec) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if isinstance(spec.system, str):
            messages.append({"role": "system", "content": spec.system})
        if isinstance(spec.messages, list):
            messages.extend(spec.messages)
        else:
            messages.append({"role": "user", "content": spec.prompt})
        return messages

    async def _chat(
        self, spec: OpenAISpec, model: str, cap: int | None, messages: list[dict[str, Any]]
    ) -> _Answer:
        kwargs: dict[str, Any] = {"model": model, "messages": messages}
        if cap is not None:
            kwargs["max_completion_tokens"] = cap
        if isinstance(spec.reasoning_effort, str):
            kwargs["reasoning_effort"] = spec.reasoning_effort
        if spec.tools:
            kwargs["tools"] = function_tools(spec.tools)
        if isinstance(spec.output_schema, dict):
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": spec.output_schema},
            }
        if not spec.stream:
            completion = await self.client.chat.completions.create(**kwargs)
            choice = completion.choices[0] if completion.choices else None
            message = choice.message if choice is not None else None
            calls = [
                ToolCall(c.id, c.function.name, arguments_of(c.function.arguments))
                for c in (message.tool_calls or [] if message is not None else [])
                if getattr(c, "function", None) is not None
            ]
            finish = choice.finish_reason if choice is not None else None
            text = (message.content or "") if message is not None else ""
            return _Answer(
                chat_usage(completion.usage),
                finish,
                completion.model,
                completion.id,
                Turn(text, calls, finish == "length"),
            )
        stream = await self.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        parts = _ChatStream(model)
        async for chunk in stream:
            parts.add(chunk)
        if parts.usage is None and parts.finish is None:
            raise StreamCutError("the stream ended before its finish_reason and its usage chunk")
        # Finished without a usage chunk (a server that ignores stream_options.include_usage):
        # the answer is whole, its tokens unknown.
        calls = [
            ToolCall(c["id"], c["name"], arguments_of(c["arguments"]))
            for _, c in sorted(parts.calls.items())
        ]
        return _Answer(
            chat_usage(parts.usage),
            parts.finish,
            parts.model,
            parts.id,
            Turn("".join(parts.text), calls, parts.finish == "length"),
        )

    async def _responses(
        self, spec: OpenAISpec, model: str, cap: int | None, items: list[dict[str, Any]]
    ) -> _Answer:
        kwargs: dict[str, Any] = {"model": model, "input": items}
        if cap is not None:
            kwargs["max_output_tokens"] = cap
        if isinstance(spec.reasoning_effort, str):
            kwargs["reasoning"] = {"effort": spec.reasoning_effort}
        if spec.tools:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "name": d.name,
                    "description": d.description,
                    "parameters": d.parameters,
                }
                for d in declarations(spec.tools)
            ]
        if isinstance(spec.output_schema, dict):
            kwargs["text"] = {
                "format": {"type": "json_schema", "name": "output", "schema": spec.output_schema}
            }
        if spec.stream:
            response: Any = None
            async for event in await self.client.responses.create(**kwargs, stream=True):
                if event.type in ("response.completed", "response.incomplete"):
                    response = event.response  # the whole response, with its usage
                elif event.type == "response.failed":
                    raise ResponseFailed(f"the response failed: {event.response.error}")
            if response is None:
                raise StreamCutError("the stream ended before response.completed")
        else:
            response = await self.client.responses.create(**kwargs)
        calls = [
            ToolCall(item.call_id, item.name, arguments_of(item.arguments))
            for item in response.output
            if item.type == "function_call"
        ]
        reason = getattr(response.incomplete_details, "reason", None)
        return _Answer(
            responses_usage(response.usage),
            response.status,
            response.model,
            response.id,
            Turn(response.output_text or "", calls, reason == "max_output_tokens", response),
        )

    async def run(self, ctx: JobContext) -> Outcome:
        """The agent loop: call, answer function calls, repeat until the model answers."""
        spec = decode(OpenAISpec, ctx.spec)
        model = ctx.model or self.default_model
        rates = ((0.0, 0.0) if self.local else ctx.rates(PROVIDER, model)) if ctx.budgeted else None
        wanted = spec.max_tokens if isinstance(spec.max_tokens, int) else 0
        conversation = self._messages(spec)
        responses = spec.api == "responses"

        async def step() -> Turn:
            cap: int | None = ctx.plan_call(
                rates, estimate_tokens(conversation), wanted or UNCAPPED
            )
            if cap == UNCAPPED and not wanted:
                cap = None  # no limit asked for and none needed: the provider's default
            started = time.perf_counter()
            try:
                if responses:
                    answer = await self._responses(spec, model, cap, conversation)
                else:
                    answer = await self._chat(spec, model, cap, conversation)
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
            usage, inconsistent, bound = answer.usage
            cost, source = (
                (0.0, "local")
                if self.local
                # A price of a usage that contradicted itself would be a guess: unknown.
                else (None, "unpriced")
                if inconsistent
                else ctx.price(PROVIDER, answer.model or model, usage)
            )
            await ctx.record(
                LLMCall(
                    provider=PROVIDER,
                    request_model=model,
                    response_model=answer.model,
                    usage=usage,
                    finish_reason=answer.finish,
                    cost_usd=cost,
                    cost_source=source,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    request_id=answer.request_id,
                    tokens_unavailable=usage.is_unknown,
                    usage_inconsistent=inconsistent,
                    input_bound=bound,
                )
            )
            return answer.turn

        def follow_up(turn: Turn, answers: list[tuple[ToolCall, str]]) -> None:
            if responses:
                # The response's output items (reasoning, function calls) go back as input.
                conversation.extend(item.model_dump(exclude_none=True) for item in turn.raw.output)
                conversation.extend(
                    {"type": "function_call_output", "call_id": call.id, "output": text}
                    for call, text in answers
                )
                return
            conversation.append(
                {
                    "role": "assistant",
                    "content": turn.text or None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {
                                "name": call.name,
                                "arguments": call.arguments
                                if isinstance(call.arguments, str)
                                else json.dumps(call.arguments),
                            },
                        }
                        for call, _ in answers
                    ],
                }
            )
            conversation.extend(
                {"role": "tool", "tool_call_id": call.id, "content": text} for call, text in answers
            )

        return await agent_loop(ctx, spec.tools, spec.output_schema, step, follow_up)


class ResponseFailed(RuntimeError):
    """A streamed Responses call ended with ``response.failed``."""


def create(config: dict[str, Any]) -> OpenAIExecutor:
    """Build from ``--executor openai[={"base_url": ..., "models": [...]}]``."""
    return OpenAIExecutor(config)

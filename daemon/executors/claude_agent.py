"""Claude Agent SDK executor (official ``claude-agent-sdk``): a real agent run by Claude Code.

Spec: ``prompt`` (str, required), ``systemPrompt`` (str), ``allowedTools`` (list of Claude
Code tool names the agent may use without asking), ``maxThinkingTokens`` (int).
Limits: ``maxTurns`` and ``budgetUsd`` are handed to the SDK (``max_turns``,
``max_budget_usd``); token limits are enforced by Tally on each step as it arrives.

Config (``--executor claude-agent={...}``): ``cli_path`` (the ``claude`` executable; default
the SDK's bundled one), ``model`` (default model), ``models``, ``cwd``, ``permission_mode``,
``env`` (extra environment for the CLI; ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL``
are inherited from the daemon's environment).

Accounting, in one place:

- Live ``job:generation`` frames, one per API call ("step"). Claude Code prints one
  assistant message per content block, and every message of one API response carries the
  same ``message.id`` and the same usage. Steps are therefore de-duplicated by message id,
  each bucket taking the largest value seen for that id, and a step is reported when the
  next id starts in the same thread (the main agent, or one sub-agent by
  ``parent_tool_use_id``) or the run ends. A step's duration runs from the tool results
  that preceded it to its last message. Steps carry tokens only: their cost is in the SDK's
  estimate, which arrives with the result.
- The job's totals come from the result's ``modelUsage`` (Anthropic's convention: input
  excludes cache reads and writes, so it is passed through), summed per model. That
  includes calls Claude Code made without printing them (e.g. a small model for titles).
  Cost is ``total_cost_usd``, marked ``sdk_estimate``.
- Error subtypes map to ``stopReason``: ``error_max_turns`` -> ``max_turns``,
  ``error_max_budget_usd`` -> ``budget``, anything else that is an error -> ``error``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from daemon.executors.base import JobContext, LLMCall, Outcome
from shared.specs import ClaudeAgentSpec, SpecError, decode
from shared.usage import CallUsage, Usage

PROVIDER = "anthropic"

STOP_REASONS = {"error_max_turns": "max_turns", "error_max_budget_usd": "budget"}


def usage_of(usage: Any) -> Usage:
    """An Anthropic-shaped usage dict (``input_tokens``...) -> Tally buckets."""
    if not isinstance(usage, dict):
        return Usage()
    return Usage.from_anthropic(
        _count(usage.get("input_tokens")),
        _count(usage.get("output_tokens")),
        _count(usage.get("cache_read_input_tokens")),
        _count(usage.get("cache_creation_input_tokens")),
    )


def model_usage_of(model_usage: Any) -> list[CallUsage]:
    """The result's ``modelUsage`` (camelCase, keyed by model) -> one entry per model."""
    if not isinstance(model_usage, dict):
        return []
    entries = []
    for model, entry in sorted(model_usage.items()):
        if not isinstance(entry, dict) or not model:
            continue
        entries.append(
            CallUsage(
                model=str(model),
                usage=Usage.from_anthropic(
                    _count(entry.get("inputTokens")),
                    _count(entry.get("outputTokens")),
                    _count(entry.get("cacheReadInputTokens")),
                    _count(entry.get("cacheCreationInputTokens")),
                ),
                cost_usd=_amount(entry.get("costUSD")),
                provider=PROVIDER,
            )
        )
    return entries


def _amount(value: Any) -> float | None:
    """A cost as the CLI printed it; anything but a non-negative number is unknown."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _count(value: Any) -> int | None:
    """A token count as the CLI printed it; anything but a non-negative int is unknown."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass
class _Step:
    """One API response being assembled from the messages that share its id."""

    message_id: str | None
    model: str | None
    started: float
    usage: Usage = field(default_factory=Usage)
    stop_reason: str | None = None
    last_seen: float = 0.0


class Steps:
    """Turns the CLI's assistant messages into one LLM call per API response.

    Messages are grouped by thread (``parent_tool_use_id``: the main agent, or one
    sub-agent), so sub-agents running side by side do not split each other's responses; an
    id already reported is never reported again.
    """

    def __init__(self, ctx: JobContext, request_model: str | None) -> None:
        self.ctx = ctx
        self.request_model = request_model
        self.open: dict[str | None, _Step] = {}
        self.reported: set[str] = set()
        self.boundary: dict[str | None, float] = {}
        self.created = time.perf_counter()

    def tool_results(self, message: Any) -> None:
        """A user message (tool results) went back: the thread's next call starts now."""
        self.boundary[getattr(message, "parent_tool_use_id", None)] = time.perf_counter()

    async def see(self, message: Any) -> None:
        """One assistant message: part of its thread's current step, or the start of a new one."""
        now = time.perf_counter()
        thread = getattr(message, "parent_tool_use_id", None)
        message_id = getattr(message, "message_id", None)
        if message_id is not None and message_id in self.reported:
            return
        step = self.open.get(thread)
        if step is not None and (message_id is None or message_id != step.message_id):
            await self._report(thread)
            step = None
        if step is None:
            started = self.boundary.get(thread, self.created)
            step = self.open[thread] = _Step(message_id, message.model, started)
        seen = usage_of(getattr(message, "usage", None))
        step.usage = Usage(*(_max(getattr(step.usage, b), getattr(seen, b)) for b in _BUCKETS))
        stop_reason = getattr(message, "stop_reason", None)
        if stop_reason:
            step.stop_reason = stop_reason
        step.last_seen = now
        self.boundary[thread] = now

    async def flush(self, *, enforce: bool = True) -> None:
        """Report every open step; ``enforce`` checks the job's token limits after each."""
        for thread in list(self.open):
            await self._report(thread, enforce=enforce)

    async def _report(self, thread: str | None, *, enforce: bool = True) -> None:
        step = self.open.pop(thread)
        if step.message_id is not None:
            self.reported.add(step.message_id)
        call = LLMCall(
            provider=PROVIDER,
            request_model=self.request_model,
            response_model=step.model,
            usage=step.usage,
            finish_reason=step.stop_reason,
            duration_ms=max(0.0, step.last_seen - step.started) * 1000,
            request_id=step.message_id,
            tokens_unavailable=step.usage.is_unknown,
        )
        await self.ctx.record(call, enforce=enforce)


_BUCKETS = ("input", "output", "cache_read", "cache_creation", "reasoning")


def outcome_of(result: Any, request_model: str | None, steps: list[LLMCall]) -> Outcome:
    """The SDK's ``ResultMessage`` -> how the job ended, with the SDK's totals and cost."""
    entries = model_usage_of(result.model_usage)
    if not entries:
        # No per-model breakdown: the result's aggregate usage, else the steps.
        usage = usage_of(result.usage)
        if not usage.is_unknown:
            model = request_model or (steps[-1].model if steps else "unknown")
            entries = [CallUsage(model, usage, None, PROVIDER)]
    cost = _amount(result.total_cost_usd)
    subtype = str(result.subtype)
    success, message, stop = True, None, STOP_REASONS.get(subtype)
    if stop is not None:
        message = subtype
    elif result.is_error or subtype.startswith("error"):
        errors = getattr(result, "errors", None) or []
        detail = "; ".join(str(e) for e in errors) or result.result or subtype
        status = getattr(result, "api_error_status", None)
        success, stop = False, "error"
        message = f"API error {status}: {detail}" if status is not None else str(detail)
    return Outcome(
        success=success,
        error_message=message,
        stop_reason=stop or "end_turn",
        model_usage=entries or None,
        cost_usd=cost,
        cost_source="sdk_estimate" if cost is not None else None,
        num_turns=result.num_turns if isinstance(result.num_turns, int) else None,
        output=result.result if success and isinstance(result.result, str) else None,
    )


class ClaudeAgentExecutor:
    """Runs one agent per job through the SDK, reporting each API call as it completes."""

    name = "claude-agent"

    def __init__(self, config: dict[str, Any]) -> None:
        import claude_agent_sdk  # noqa: F401  (fail at start-up when the extra is missing)

        self.models: list[str] = list(config.get("models", []))
        self.default_model: str | None = config.get("model")
        self.cli_path: str | None = config.get("cli_path")
        self.cwd: str | None = config.get("cwd")
        self.permission_mode: str | None = config.get("permission_mode")
        env = config.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise SpecError("claude-agent config: env must be an object of strings")
        self.env: dict[str, str] = dict(env)

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Check the spec before accepting the offer."""
        decode(ClaudeAgentSpec, spec)

    def _options(self, ctx: JobContext) -> Any:
        from claude_agent_sdk import ClaudeAgentOptions

        spec = ctx.spec
        options: dict[str, Any] = {
            "model": ctx.model or self.default_model,
            "max_turns": ctx.limit("max_turns"),
            "max_budget_usd": ctx.limit("budget_usd"),
            "allowed_tools": list(spec.get("allowedTools", [])),
            "system_prompt": spec.get("systemPrompt"),
            "cli_path": self.cli_path,
            "cwd": self.cwd,
            "permission_mode": self.permission_mode,
            "env": self.env,
        }
        if spec.get("maxThinkingTokens"):
            options["max_thinking_tokens"] = int(spec["maxThinkingTokens"])
        return ClaudeAgentOptions(**options)

    async def run(self, ctx: JobContext) -> Outcome:
        """Stream the agent's messages; steps live, totals from the result."""
        from claude_agent_sdk import AssistantMessage, ResultMessage, UserMessage, query

        options = self._options(ctx)
        steps = Steps(ctx, options.model)
        messages = query(prompt=ctx.spec["prompt"], options=options)
        try:
            async for message in messages:
                if isinstance(message, AssistantMessage):
                    await steps.see(message)
                elif isinstance(message, UserMessage):
                    steps.tool_results(message)
                elif isinstance(message, ResultMessage):
                    await steps.flush()
                    return outcome_of(message, options.model, ctx.calls)
        except BaseException:
            # Cancelled, timed out, over a limit or the CLI died: what was spent is reported.
            await steps.flush(enforce=False)
            raise
        finally:
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                await aclose()
        await steps.flush()
        return Outcome(
            success=False,
            error_message="the Claude Code CLI ended without a result",
            stop_reason="error",
        )


def create(config: dict[str, Any]) -> ClaudeAgentExecutor:
    """Build from ``--executor claude-agent[={"cli_path": ..., "model": ...}]``."""
    return ClaudeAgentExecutor(config)

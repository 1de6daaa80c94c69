"""The one agent loop every tool-calling executor runs: call the model, answer the tools it
asks for, call again, until it answers without asking (or a limit stops it).

An executor supplies one step (a provider call, recorded through ``ctx.record``, returning a
:class:`Turn`) and how to add a turn and its tool results to its conversation. Limits
(``maxTurns``, token limits, budget, timeout) are enforced by the context and the runner
exactly as for any call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.executors.base import JobContext, Outcome
from daemon.tools import unknown
from shared.specs import SpecError

_FENCE = re.compile(r"^\s*```(?:json)?\s*(?P<body>.*?)\s*```\s*$", re.S)


class OutputError(ValueError):
    """The spec asked for a JSON object (``outputSchema``) and the model answered otherwise."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call a model asked for: the provider's id, the name, the arguments (an object,
    or the raw text when the provider sends it as a string)."""

    id: str
    name: str
    arguments: dict[str, Any] | str


@dataclass(slots=True)
class Turn:
    """What one provider call answered."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    # The answer was cut by the output token cap.
    truncated: bool = False
    # The provider's own record of the turn, for the executor to put back in the conversation.
    raw: Any = None


def final_output(text: str, schema: object) -> str | dict[str, Any]:
    """The job's output: the text, or the JSON object it holds when the spec has a schema."""
    if not isinstance(schema, dict):
        return text
    match = _FENCE.match(text)
    try:
        value = json.loads(match.group("body") if match else text)
    except json.JSONDecodeError as exc:
        raise OutputError(
            f"outputSchema asked for a JSON object; the answer is not JSON: {exc}"
        ) from None
    if not isinstance(value, dict):
        raise OutputError("outputSchema asked for a JSON object; the answer is not an object")
    return value


def schema_instruction(schema: dict[str, Any]) -> str:
    """The instruction that asks a provider without a JSON mode for a JSON object."""
    return (
        "Answer with one JSON object, and nothing else, that matches this JSON schema: "
        + json.dumps(schema, ensure_ascii=False)
    )


def check_tools(names: list[str]) -> None:
    """Refuse a spec naming a tool this daemon does not answer (the offer is rejected)."""
    missing = unknown(names)
    if missing:
        raise SpecError(f"no tool {missing[0]!r} on this daemon", "$.spec.tools")


def arguments_of(raw: object) -> dict[str, Any] | str:
    """Tool arguments as sent: an object, or the text of one (kept when it does not parse, so
    the tool answers with the error)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return raw
        return value if isinstance(value, dict) else raw
    return {}


async def agent_loop(
    ctx: JobContext,
    allowed: list[str],
    schema: object,
    step: Callable[[], Awaitable[Turn]],
    follow_up: Callable[[Turn, list[tuple[ToolCall, str]]], None],
) -> Outcome:
    """Run steps until a turn asks for no tool; each asked tool is answered and reported."""
    while True:
        turn = await step()
        if not turn.tool_calls:
            if turn.truncated:
                return Outcome(stop_reason="max_output_tokens", output=turn.text or None)
            return Outcome(output=final_output(turn.text, schema))
        answers = [
            (call, await ctx.run_tool(call.name, call.arguments, allowed))
            for call in turn.tool_calls
        ]
        follow_up(turn, answers)

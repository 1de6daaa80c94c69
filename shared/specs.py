"""Each built-in executor's ``spec`` as a typed struct: checked at submit by the orchestrator
and decoded by the daemon's executor, so both read one definition.

A spec is refused with the JSON path of its bad field (``$.spec.maxTokens``). Unknown fields
are refused too: a misspelt ``promt`` would otherwise run a job without its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from shared.limits import Name

Tokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
NonNegative = Annotated[int, Meta(ge=0, le=2**31 - 1)]
ToolNames = Annotated[list[Name], Meta(max_length=128)]
Messages = Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=100_000)]


class SpecError(ValueError):
    """A spec its executor cannot run: ``path`` names the field (``$.spec.prompt``)."""

    def __init__(self, message: str, path: str = "$.spec") -> None:
        super().__init__(f"{message} (at {path})")
        self.message = message
        self.path = path


class _Spec(Struct, rename="camel", forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every spec: camelCase keys, no unknown key."""


class _Conversation(_Spec, frozen=True):
    """What every agent-loop executor reads: the conversation, its tools and its answer."""

    prompt: str | UnsetType = UNSET
    system: str | UnsetType = UNSET
    stream: bool = False
    max_tokens: Tokens | UnsetType = UNSET
    # Names of tools the daemon registers; the loop answers them until the model stops asking.
    tools: ToolNames = []
    # A JSON schema: the model is asked for a JSON object, which is the job's output.
    output_schema: dict[str, Any] | UnsetType = UNSET
    # Run a budgeted job on a model without a price (its cost is then unknown).
    allow_unpriced: bool = False

    def __post_init__(self) -> None:
        if self.prompt is UNSET and getattr(self, "messages", UNSET) is UNSET:
            raise ValueError("a prompt (string) or messages (list) is required")


class AnthropicSpec(_Conversation, frozen=True):
    """``anthropic``: the Messages API."""

    messages: Messages | UnsetType = UNSET
    cache_system: bool = False
    # Extended thinking's budget; 0 leaves thinking off.
    thinking_budget_tokens: NonNegative | UnsetType = UNSET


class OpenAISpec(_Conversation, frozen=True):
    """``openai``: Chat Completions (``api: chat``) or the Responses API."""

    messages: Messages | UnsetType = UNSET
    api: Literal["chat", "responses"] = "chat"
    # Passed through as the provider names it (minimal, low, medium, high, ...).
    reasoning_effort: Name | UnsetType = UNSET


class OllamaSpec(_Conversation, frozen=True):
    """``ollama``: the native chat API."""

    messages: Messages | UnsetType = UNSET


class GeminiSpec(_Conversation, frozen=True):
    """``gemini``: generateContent (a prompt; no message list)."""

    thinking_budget_tokens: NonNegative | UnsetType = UNSET


class ClaudeAgentSpec(_Spec, frozen=True):
    """``claude-agent``: a Claude Code run."""

    prompt: Annotated[str, Meta(min_length=1)]
    system_prompt: str | UnsetType = UNSET
    allowed_tools: ToolNames = []
    max_thinking_tokens: Tokens | UnsetType = UNSET


class SimulatedSpec(_Spec, frozen=True):
    """``simulated``: deterministic usage with prompt caching, for demos and load."""

    prompt: str = "hello"
    turns: NonNegative = 2
    prompt_tokens: NonNegative | UnsetType = UNSET
    cache_prefix_tokens: NonNegative = 0
    output_tokens: NonNegative | UnsetType = UNSET
    reasoning_tokens: NonNegative = 0
    latency_ms: NonNegative = 0
    # true: fail after the calls; an integer: fail before that call index.
    fail: bool | NonNegative = False
    # Tools answered between turns (each turn but the last asks for them all).
    tools: ToolNames = []
    output_schema: dict[str, Any] | UnsetType = UNSET
    allow_unpriced: bool = False


SPECS: dict[str, type[_Spec]] = {
    "anthropic": AnthropicSpec,
    "openai": OpenAISpec,
    "ollama": OllamaSpec,
    "gemini": GeminiSpec,
    "claude-agent": ClaudeAgentSpec,
    "simulated": SimulatedSpec,
}

S = TypeVar("S", bound=_Spec)


def decode(kind: type[S], spec: dict[str, Any]) -> S:
    """The spec as its executor's struct; SpecError naming the bad field."""
    try:
        return msgspec.convert(spec, kind)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `")
        path = "$.spec" + where.rstrip("`").removeprefix("$") if where else "$.spec"
        name = message.split("`")[1][:64] if "`" in message else "?"
        if message.startswith("Object contains unknown field"):
            message = f"unknown field {name!r} (known: {', '.join(_fields(kind))})"
            path = f"{path}.{name}"
        elif message.startswith("Object missing required field"):
            message = "required"
            path = f"{path}.{name}"
        raise SpecError(message, path) from None


def check(executor: str, spec: dict[str, Any]) -> None:
    """Refuse a spec a built-in executor cannot run (another executor's spec is its own)."""
    kind = SPECS.get(executor)
    if kind is not None:
        decode(kind, spec)


def first_bad(jobs: Sequence[Any]) -> tuple[int, SpecError] | None:
    """The first job (index, error) whose spec its built-in executor cannot run, or None."""
    for i, job in enumerate(jobs):
        try:
            check(job.executor, job.spec)
        except SpecError as exc:
            return i, exc
    return None


def _fields(kind: type[_Spec]) -> list[str]:
    return list(kind.__struct_encode_fields__)

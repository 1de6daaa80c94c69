"""Tally's one usage convention (Anthropic's), as a value type.

``input`` excludes cache reads and cache writes; ``output`` includes reasoning, and
``reasoning`` is the informational subset of it. ``None`` means *not reported*, which is
different from 0: adding an unknown to a known keeps the known value, adding two unknowns
stays unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

from msgspec import UNSET

from shared.limits import MAX_COUNTER

BUCKETS = ("input", "output", "cache_read", "cache_creation", "reasoning")

# bucket -> camelCase wire field
WIRE_FIELDS: Mapping[str, str] = {
    "input": "inputTokens",
    "output": "outputTokens",
    "cache_read": "cacheReadInputTokens",
    "cache_creation": "cacheCreationInputTokens",
    "reasoning": "reasoningTokens",
}
# bucket -> snake_case attribute on the protocol payload structs and database column
COLUMNS: Mapping[str, str] = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "reasoning": "reasoning_tokens",
}


def _add(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _count(value: Any) -> tuple[int | None, bool]:
    """A reported token count: (the count, False), (None, False) when not reported, or
    (None, True) when what was reported is not a count (negative, too large, not an int)."""
    if value is None:
        return None, False
    if type(value) is int and 0 <= value <= MAX_COUNTER:
        return value, False
    return None, True


def input_bound(*counts: Any) -> int | None:
    """An upper bound of a call's total input when the provider's counts leave its split
    unknown (a cached part above the prompt: whether the prompt was reported with its cached
    part or without it, the input is at most their sum): the sum of the counts given, None
    when one of them is not a count. Used to enforce a job's limits, never stored."""
    total = 0
    for value in counts:
        count, bad = _count(value)
        if bad:
            return None
        total += count or 0
    return total


def money(value: float) -> Decimal:
    """A float amount as the decimal it was written as (its shortest repr), for exact sums."""
    return Decimal(repr(float(value)))


def _add_money(a: float | None, b: float | None) -> float | None:
    # Decimal addition of the written values, so that 0.1 + 0.2 is 0.3 as the ledger sums it.
    if a is None:
        return b
    if b is None:
        return a
    return float(money(a) + money(b))


@dataclass(slots=True)
class Usage:
    """Token usage of one call, one model or one job, in Tally's convention.

    Treat it as immutable: every operation returns a new value. (Not ``frozen=True`` only
    because a frozen dataclass costs five times as much to build, and the ledger writer
    builds many.)
    """

    input: int | None = None
    output: int | None = None
    cache_read: int | None = None
    cache_creation: int | None = None
    reasoning: int | None = None

    @classmethod
    def from_anthropic(
        cls,
        input_tokens: int | None,
        output_tokens: int | None,
        cache_read_input_tokens: int | None = None,
        cache_creation_input_tokens: int | None = None,
    ) -> Usage:
        """Anthropic and the Claude Agent SDK already report input excluding cache: pass through."""
        return cls(
            input=input_tokens,
            output=output_tokens,
            cache_read=cache_read_input_tokens,
            cache_creation=cache_creation_input_tokens,
        )

    @classmethod
    def from_openai(
        cls,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        cache_write_tokens: int | None = None,
    ) -> Usage:
        """OpenAI-style input *includes* cached tokens: subtract them; output includes reasoning.

        Never raises: a usage that contradicts itself keeps what can be trusted (see
        :meth:`from_openai_checked`, which also says whether it did)."""
        return cls.from_openai_checked(
            prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cache_write_tokens
        )[0]

    @classmethod
    def from_openai_checked(
        cls,
        prompt_tokens: Any,
        completion_tokens: Any,
        cached_tokens: Any = None,
        reasoning_tokens: Any = None,
        cache_write_tokens: Any = None,
    ) -> tuple[Usage, bool]:
        """:meth:`from_openai`, and whether the usage contradicted itself.

        A prompt smaller than its cached part (some OpenAI-compatible servers report the prompt
        without it) leaves the split of the input unknowable: input, cache read and cache
        creation are then unknown, output and reasoning kept. A count that is not an integer
        in ``0 ..= 2**53 - 1`` is unknown. Either way the usage is flagged inconsistent.
        """
        prompt, bad_p = _count(prompt_tokens)
        completion, bad_c = _count(completion_tokens)
        cached, bad_r = _count(cached_tokens)
        reasoning, bad_t = _count(reasoning_tokens)
        writes, bad_w = _count(cache_write_tokens)
        flagged = bad_p or bad_c or bad_r or bad_t or bad_w
        if reasoning is not None and completion is not None and reasoning > completion:
            reasoning, flagged = None, True
        if prompt is not None and prompt < (cached or 0) + (writes or 0):
            return cls(None, completion, None, None, reasoning), True
        if bad_p or bad_r or bad_w:
            # The input's split rests on every one of the three.
            return cls(None, completion, None, None, reasoning), True
        uncached = None if prompt is None else prompt - (cached or 0) - (writes or 0)
        return cls(uncached, completion, cached, writes, reasoning), flagged

    @classmethod
    def from_gemini(
        cls,
        prompt_token_count: int | None,
        candidates_token_count: int | None,
        cached_content_token_count: int | None = None,
        thoughts_token_count: int | None = None,
    ) -> Usage:
        """Gemini reports prompt including cache and thinking outside output: convert both."""
        return cls.from_gemini_checked(
            prompt_token_count,
            candidates_token_count,
            cached_content_token_count,
            thoughts_token_count,
        )[0]

    @classmethod
    def from_gemini_checked(
        cls,
        prompt_token_count: Any,
        candidates_token_count: Any,
        cached_content_token_count: Any = None,
        thoughts_token_count: Any = None,
    ) -> tuple[Usage, bool]:
        """:meth:`from_gemini`, and whether the usage contradicted itself (a cached part larger
        than the prompt, or a count that is not a count: those buckets unknown)."""
        base, flagged = cls.from_openai_checked(
            prompt_token_count, None, cached_content_token_count
        )
        candidates, bad_c = _count(candidates_token_count)
        thoughts, bad_t = _count(thoughts_token_count)
        output = None if bad_c or bad_t else _add(candidates, thoughts)
        return cls(base.input, output, base.cache_read, None, thoughts), flagged or bad_c or bad_t

    def trusted(self) -> tuple[Usage, bool]:
        """The usage with every bucket that is not a count (an integer in ``0 ..= 2**53 - 1``)
        unknown, and reasoning unknown when it exceeds output (it is a part of it); and whether
        anything had to be dropped (the call is then flagged inconsistent)."""
        values = [_count(getattr(self, b)) for b in BUCKETS]
        flagged = any(bad for _, bad in values)
        kept = Usage(*(v for v, _ in values))
        if kept.reasoning is not None and kept.output is not None and kept.reasoning > kept.output:
            kept.reasoning, flagged = None, True
        return (kept, True) if flagged else (self, False)

    @property
    def is_unknown(self) -> bool:
        """True when no bucket was reported at all."""
        return all(getattr(self, b) is None for b in BUCKETS)

    @property
    def total_input(self) -> int | None:
        """input + cache read + cache creation (OpenTelemetry's ``gen_ai.usage.input_tokens``)."""
        parts = (self.input, self.cache_read, self.cache_creation)
        if all(p is None for p in parts):
            return None
        return sum(p or 0 for p in parts)

    @property
    def total(self) -> int | None:
        """All tokens: total input plus output (reasoning is inside output)."""
        return _add(self.total_input, self.output)

    @property
    def cache_hit_ratio(self) -> float | None:
        """cache read / total input; None when the denominator is 0 or unknown."""
        denominator = self.total_input
        if not denominator:
            return None
        return (self.cache_read or 0) / denominator

    def __add__(self, other: Usage) -> Usage:
        # Spelled out: the ledger writer adds usages for every frame it persists.
        return Usage(
            _add(self.input, other.input),
            _add(self.output, other.output),
            _add(self.cache_read, other.cache_read),
            _add(self.cache_creation, other.cache_creation),
            _add(self.reasoning, other.reasoning),
        )

    @classmethod
    def sum(cls, items: Iterable[Usage]) -> Usage:
        """Add many usages; the sum of nothing is all-unknown."""
        total = cls()
        for item in items:
            total = total + item
        return total

    def to_wire(self) -> dict[str, int]:
        """Wire fields (camelCase), omitting unknown buckets."""
        return {WIRE_FIELDS[b]: v for b in BUCKETS if (v := getattr(self, b)) is not None}

    def to_struct_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for protocol payload structs (UNSET for unknown buckets)."""
        return {COLUMNS[b]: (v if (v := getattr(self, b)) is not None else UNSET) for b in BUCKETS}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Usage:
        """Read the buckets from a camelCase wire mapping; absent keys are unknown."""
        return cls(*(data.get(WIRE_FIELDS[b]) for b in BUCKETS))

    @classmethod
    def from_entry(cls, entry: Any) -> Usage:
        """A ``modelUsage`` entry's buckets, those it names ``unreported`` unknown."""
        usage = cls.from_struct(entry)
        unreported = entry.unreported
        if unreported:  # UNSET and [] are falsy
            for bucket in BUCKETS:
                if WIRE_FIELDS[bucket] in unreported:
                    setattr(usage, bucket, None)
        return usage

    @classmethod
    def from_struct(cls, obj: Any) -> Usage:
        """Read the buckets from a protocol payload struct (UNSET is unknown)."""
        i = obj.input_tokens
        o = obj.output_tokens
        cr = obj.cache_read_input_tokens
        cc = obj.cache_creation_input_tokens
        r = getattr(obj, "reasoning_tokens", None)
        return cls(
            i if type(i) is int else None,
            o if type(o) is int else None,
            cr if type(cr) is int else None,
            cc if type(cc) is int else None,
            r if type(r) is int else None,
        )


assert [f.name for f in fields(Usage)] == list(BUCKETS)


@dataclass(frozen=True, slots=True)
class CallUsage:
    """One LLM call as the ledger sees it: which model, its usage, and its cost."""

    model: str
    usage: Usage
    cost_usd: float | None = None
    provider: str | None = None


@dataclass(frozen=True, slots=True)
class ModelRollup:
    """Usage and cost of one model within a job."""

    model: str
    usage: Usage
    cost_usd: float | None
    provider: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """A ``modelUsage`` entry: every core field present (the reference requires them),
        an unknown one written as 0 and named in ``unreported`` so it stays unknown."""
        entry: dict[str, Any] = {
            "model": self.model,
            "inputTokens": self.usage.input or 0,
            "outputTokens": self.usage.output or 0,
            "cacheReadInputTokens": self.usage.cache_read or 0,
            "cacheCreationInputTokens": self.usage.cache_creation or 0,
            "costUsd": self.cost_usd or 0.0,
        }
        if self.provider is not None:
            entry["provider"] = self.provider
        if self.usage.reasoning is not None:
            entry["reasoningTokens"] = self.usage.reasoning
        unreported = [WIRE_FIELDS[b] for b in BUCKETS[:4] if getattr(self.usage, b) is None]
        if self.cost_usd is None:
            unreported.append("costUsd")
        if unreported:
            entry["unreported"] = unreported
        return entry


def entry_cost(entry: Any) -> float | None:
    """A ``modelUsage`` entry's cost, None when it names ``costUsd`` unreported."""
    unreported = entry.unreported
    if unreported and "costUsd" in unreported:
        return None
    return float(entry.cost_usd)


def rollup(calls: Iterable[CallUsage]) -> list[ModelRollup]:
    """Per-model totals, sorted by model, models with nothing reported left out."""
    by_model: dict[str, tuple[Usage, float | None, str | None]] = {}
    for call in calls:
        usage, cost, provider = by_model.get(call.model, (Usage(), None, call.provider))
        by_model[call.model] = (usage + call.usage, _add_money(cost, call.cost_usd), provider)
    return [
        ModelRollup(model, usage, cost, provider)
        for model, (usage, cost, provider) in sorted(by_model.items())
        if not (usage.is_unknown and cost is None)
    ]


def total_cost(calls: Iterable[CallUsage]) -> float | None:
    """Sum of known call costs; None when no call had a cost."""
    total: float | None = None
    for call in calls:
        total = _add_money(total, call.cost_usd)
    return total

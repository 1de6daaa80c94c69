"""The usage convention: one set of buckets whatever the provider, unknown kept apart from zero."""

from __future__ import annotations

from shared.usage import CallUsage, ModelRollup, Usage, rollup, total_cost


def test_anthropic_and_openai_styles_normalise_to_the_same_buckets() -> None:
    """Anthropic excludes cache from input, OpenAI includes it: both land in the same buckets."""
    anthropic = Usage.from_anthropic(
        input_tokens=100,
        output_tokens=50,
        cache_read_input_tokens=900,
        cache_creation_input_tokens=0,
    )
    openai = Usage.from_openai(
        prompt_tokens=1000, completion_tokens=50, cached_tokens=900, cache_write_tokens=0
    )
    assert anthropic == openai == Usage(100, 50, 900, 0, None)
    assert anthropic.total_input == 1000


def test_openai_reasoning_is_a_subset_of_output() -> None:
    """Reasoning tokens are reported inside output, not added to it."""
    usage = Usage.from_openai(prompt_tokens=10, completion_tokens=500, reasoning_tokens=400)
    assert (usage.output, usage.reasoning) == (500, 400)
    assert usage.total == 510


def test_gemini_thinking_is_added_to_output() -> None:
    """Gemini reports thoughts outside candidates: output = candidates + thoughts."""
    usage = Usage.from_gemini(
        prompt_token_count=1000,
        candidates_token_count=100,
        cached_content_token_count=600,
        thoughts_token_count=50,
    )
    assert usage == Usage(input=400, output=150, cache_read=600, cache_creation=None, reasoning=50)


def test_openai_cached_above_prompt_is_unknown_not_an_error() -> None:
    """More cached than prompt tokens: the input side is unknown (never clamped), output kept,
    and the usage is flagged; it never raises (issue 25, item 3)."""
    usage = Usage.from_openai(prompt_tokens=10, completion_tokens=1, cached_tokens=11)
    assert usage == Usage(input=None, output=1, cache_read=None, cache_creation=None)
    assert Usage.from_openai_checked(10, 1, 11)[1] is True


def test_unknown_is_not_zero() -> None:
    """An unreported bucket stays None; a reported 0 stays 0."""
    unknown = Usage()
    zero = Usage(0, 0, 0, 0, 0)
    assert unknown.is_unknown and not zero.is_unknown
    assert unknown.total_input is None and zero.total_input == 0
    assert unknown.to_wire() == {}
    assert zero.to_wire()["cacheReadInputTokens"] == 0


def test_addition_keeps_known_values() -> None:
    """Adding unknown to known keeps the known; two unknowns stay unknown."""
    a = Usage(input=5, output=None, cache_read=1)
    b = Usage(input=None, output=3, cache_read=2)
    assert a + b == Usage(input=5, output=3, cache_read=3)
    assert (Usage() + Usage()).is_unknown
    assert Usage.sum([a, b, Usage()]) == a + b
    assert Usage.sum([]).is_unknown


def test_hit_ratio_undefined_at_zero_denominator() -> None:
    """The cache hit ratio is None when no input was reported or all input was 0."""
    assert Usage().cache_hit_ratio is None
    assert Usage(0, 5, 0, 0).cache_hit_ratio is None
    assert Usage(input=25, cache_read=50, cache_creation=25).cache_hit_ratio == 0.5


def test_wire_round_trip() -> None:
    """to_wire and from_wire are inverse, including unknown buckets."""
    usage = Usage(input=1, output=None, cache_read=3_000_000_000, cache_creation=None, reasoning=0)
    assert Usage.from_wire(usage.to_wire()) == usage


def test_rollup_sorted_by_model_and_empty_omitted() -> None:
    """Per-model rollup is sorted by model and leaves out models with nothing reported."""
    calls = [
        CallUsage("zeta", Usage(1, 1), 0.5, "openai"),
        CallUsage("alpha", Usage(2, 2, 2, 2), 0.25, "anthropic"),
        CallUsage("zeta", Usage(1, 1, reasoning=1), None, "openai"),
        CallUsage("empty", Usage(), None, "ollama"),
    ]
    rolled = rollup(calls)
    assert [r.model for r in rolled] == ["alpha", "zeta"]
    assert rolled[1] == ModelRollup("zeta", Usage(2, 2, reasoning=1), 0.5, "openai")
    assert rolled[1].to_wire() == {
        "model": "zeta",
        "inputTokens": 2,
        "outputTokens": 2,
        "cacheReadInputTokens": 0,
        "cacheCreationInputTokens": 0,
        "costUsd": 0.5,
        "provider": "openai",
        "reasoningTokens": 1,
        # unknown buckets carry the reference's required 0 and are named, so they stay unknown
        "unreported": ["cacheReadInputTokens", "cacheCreationInputTokens"],
    }
    assert total_cost(calls) == 0.75
    assert total_cost([]) is None

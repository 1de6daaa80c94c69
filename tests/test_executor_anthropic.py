"""The Anthropic executor on the real SDK against a local server in Anthropic's wire format."""

from __future__ import annotations

from typing import Any

import pytest

from shared import protocol as p
from tests.fakeprovider import FakeProvider, Scripted, cache_buckets, run_offer, serving

pytest.importorskip("anthropic")

MODEL = "claude-sonnet-4-6"


def message(
    stop: str,
    usage: dict[str, int] | None,
    content: list[dict[str, Any]] | None = None,
    mid: str = "msg_1",
) -> dict[str, Any]:
    """A Messages API response body."""
    body: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content or [{"type": "text", "text": "done"}],
        "stop_reason": stop,
        "stop_sequence": None,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def usage(inp: int, out: int, read: int = 0, write: int = 0) -> dict[str, int]:
    """An Anthropic usage object."""
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": write,
    }


async def run(
    base_url: str, spec: dict[str, Any], limits: p.Limits | None = None
) -> tuple[list[p.JobGeneration], p.JobResult]:
    """Run one job through the real runner and executor; return its frames."""
    from daemon.executors.anthropic import AnthropicExecutor

    return await run_offer(
        AnthropicExecutor({"base_url": base_url, "api_key": "test", "max_retries": 2}),
        "anthropic",
        MODEL,
        spec,
        limits,
    )


async def test_cache_write_then_read_across_a_tool_loop() -> None:
    """A tool call then an answer: the first call writes the cache, the second reads it."""
    provider = FakeProvider(
        [
            Scripted(
                body=message(
                    "tool_use",
                    usage(100, 20, 0, 2000),
                    [{"type": "tool_use", "id": "tu_1", "name": "current_time", "input": {}}],
                )
            ),
            Scripted(body=message("end_turn", usage(30, 50, 2000, 0), mid="msg_2")),
        ]
    )
    with serving(provider) as url:
        calls, result = await run(
            url,
            {
                "prompt": "what time is it?",
                "system": "x" * 100,
                "cacheSystem": True,
                "tools": ["current_time"],
            },
        )
    assert [cache_buckets(c.payload) for c in calls] == [(100, 0, 2000, 20), (30, 2000, 0, 50)]
    assert cache_buckets(result.payload) == (130, 2000, 2000, 70)
    assert result.payload.success and result.payload.num_turns == 2
    assert provider.requests[0]["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert provider.requests[1]["messages"][-1]["content"][0]["type"] == "tool_result"
    assert calls[0].payload.cost_source == "price_table"
    [entry] = result.payload.model_usage  # type: ignore[misc]
    assert (entry.model, entry.input_tokens, entry.cache_read_input_tokens) == (MODEL, 130, 2000)


async def test_rate_limit_then_success() -> None:
    """A 429 is retried by the SDK; only the successful call is recorded."""
    provider = FakeProvider(
        [
            Scripted(
                status=429,
                body={
                    "type": "error",
                    "error": {"type": "rate_limit_error", "message": "slow down"},
                },
                headers={"retry-after": "0"},
            ),
            Scripted(body=message("end_turn", usage(10, 5))),
        ]
    )
    with serving(provider) as url:
        calls, result = await run(url, {"prompt": "hi"})
    assert len(provider.requests) == 2
    assert [cache_buckets(c.payload) for c in calls] == [(10, 0, 0, 5)]
    assert result.payload.success


def sse(inp: int, read: int, final_output: int) -> list[tuple[str, dict[str, Any]]]:
    """A streamed message: usage in message_start, final output count in message_delta."""
    start = message(
        "end_turn",
        {
            "input_tokens": inp,
            "output_tokens": 1,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": 0,
        },
    )
    start["content"], start["stop_reason"] = [], None
    return [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hello"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": final_output},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def sse_tool(inp: int, out: int) -> list[tuple[str, dict[str, Any]]]:
    """A streamed message asking for the current_time tool."""
    start = message("tool_use", {"input_tokens": inp, "output_tokens": 1})
    start["content"], start["stop_reason"] = [], None
    return [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {
                    "type": "tool_use",
                    "id": "tu_1",
                    "name": "current_time",
                    "input": {},
                },
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "{}"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": out},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


async def test_stream_takes_final_totals() -> None:
    """A streamed call reports the final running totals (42), not a sum of deltas (43)."""
    provider = FakeProvider([Scripted(events=sse(12, 500, 42))])
    with serving(provider) as url:
        calls, result = await run(url, {"prompt": "hi", "stream": True})
    assert [cache_buckets(c.payload) for c in calls] == [(12, 500, 0, 42)]
    assert cache_buckets(result.payload) == (12, 500, 0, 42)


async def test_stream_cut_before_usage_fails_and_keeps_earlier_calls() -> None:
    """A stream cut before its final usage fails the job; the earlier call's usage is kept."""
    provider = FakeProvider(
        [
            Scripted(events=sse_tool(100, 20)),
            Scripted(events=sse(12, 0, 42), cut_after=3),
        ]
    )
    with serving(provider) as url:
        calls, result = await run(url, {"prompt": "hi", "stream": True, "tools": ["current_time"]})
    assert not result.payload.success and result.payload.stop_reason == "error"
    assert "message_stop" in str(result.payload.error_message)
    # The cut call keeps its final input counts (message_start) and leaves output unknown.
    assert [cache_buckets(c.payload) for c in calls] == [
        (100, p.UNSET, p.UNSET, 20),
        (12, 0, 0, p.UNSET),
    ]
    assert cache_buckets(result.payload) == (112, 0, 0, 20)


async def test_response_without_usage_is_unknown_not_zero() -> None:
    """A response with no usage records the call with tokensUnavailable and no buckets."""
    provider = FakeProvider([Scripted(body=message("end_turn", None))])
    with serving(provider) as url:
        calls, result = await run(url, {"prompt": "hi"})
    assert calls[0].payload.tokens_unavailable is True
    assert cache_buckets(calls[0].payload) == (p.UNSET,) * 4
    assert result.payload.tokens_unavailable is True


async def test_max_turns_stops_the_loop() -> None:
    """A model that keeps asking for tools is stopped at maxTurns."""
    tool = [{"type": "tool_use", "id": "tu", "name": "current_time", "input": {}}]
    provider = FakeProvider(
        [Scripted(body=message("tool_use", usage(5, 5), tool)) for _ in range(5)]
    )
    with serving(provider) as url:
        calls, result = await run(
            url, {"prompt": "loop", "tools": ["current_time"]}, p.Limits(max_turns=3)
        )
    assert len(calls) == 3 and result.payload.stop_reason == "max_turns"
    assert cache_buckets(result.payload) == (15, 0, 0, 15)

"""The OpenAI executor on the real SDK against a local server in OpenAI's wire format."""

from __future__ import annotations

from typing import Any

import pytest

from shared import protocol as p
from tests.fakeprovider import FakeProvider, Scripted, run_offer, serving

pytest.importorskip("openai")

MODEL = "gpt-4.1-mini"


def completion(usage: dict[str, Any] | None, finish: str = "stop") -> dict[str, Any]:
    """A Chat Completions response body."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": "ok"}}
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chat_usage(
    prompt: int, completion_tokens: int, cached: int = 0, reasoning: int = 0
) -> dict[str, Any]:
    """OpenAI usage with its details objects."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def chunk(
    delta: dict[str, Any],
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
) -> tuple[str, dict[str, Any]]:
    """One streamed chunk (OpenAI streams have no event names)."""
    body: dict[str, Any] = {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        body["usage"] = usage
    return "", body


# A Responses API body with cached input and reasoning (also used by tests/test_ledger_truth.py).
RESPONSES_BODY: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "model": MODEL,
    "status": "completed",
    "output": [],
    "parallel_tool_calls": False,
    "tool_choice": "auto",
    "tools": [],
    "usage": {
        "input_tokens": 900,
        "output_tokens": 120,
        "total_tokens": 1020,
        "input_tokens_details": {"cached_tokens": 800},
        "output_tokens_details": {"reasoning_tokens": 64},
    },
}


async def run(base_url: str, spec: dict[str, Any]) -> tuple[list[p.JobGeneration], p.JobResult]:
    """Run one job through the real runner and executor; return its frames."""
    from daemon.executors.openai import OpenAIExecutor

    return await run_offer(
        OpenAIExecutor({"base_url": base_url + "/v1", "api_key": "test", "max_retries": 2}),
        "openai",
        MODEL,
        spec,
    )


def buckets(payload: Any) -> tuple[Any, ...]:
    """(input, cache read, output, reasoning) of a payload, UNSET kept."""
    return (
        payload.input_tokens,
        payload.cache_read_input_tokens,
        payload.output_tokens,
        payload.reasoning_tokens,
    )


async def test_cached_and_reasoning_response() -> None:
    """Cached tokens are subtracted from input; reasoning stays inside output."""
    provider = FakeProvider([Scripted(body=completion(chat_usage(1200, 300, 1024, 200)))])
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "think", "system": "be brief"})
    assert buckets(call.payload) == (176, 1024, 300, 200)
    assert call.payload.cache_creation_input_tokens is p.UNSET
    assert buckets(result.payload) == (176, 1024, 300, 200)
    assert provider.requests[0]["messages"][0] == {"role": "system", "content": "be brief"}


async def test_stream_takes_usage_chunk() -> None:
    """A streamed call asks for include_usage and takes the final usage chunk."""
    provider = FakeProvider(
        [
            Scripted(
                events=[
                    chunk({"role": "assistant", "content": ""}),
                    chunk({"content": "hel"}),
                    chunk({"content": "lo"}, finish="stop"),
                    chunk({}, usage=chat_usage(50, 7, 32), choices=False),
                ]
            )
        ]
    )
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi", "stream": True})
    assert provider.requests[0]["stream_options"] == {"include_usage": True}
    assert buckets(call.payload) == (18, 32, 7, 0)
    assert result.payload.success


async def test_stream_cut_before_usage() -> None:
    """A stream without its usage chunk records an unavailable call and fails the job."""
    provider = FakeProvider(
        [
            Scripted(
                events=[
                    chunk({"role": "assistant", "content": ""}),
                    chunk({"content": "hel"}),
                ]
            )
        ]
    )
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi", "stream": True})
    assert call.payload.tokens_unavailable is True
    assert buckets(call.payload) == (p.UNSET,) * 4
    assert not result.payload.success and "usage chunk" in str(result.payload.error_message)


async def test_response_without_usage() -> None:
    """No usage in the response: unknown, not zero."""
    provider = FakeProvider([Scripted(body=completion(None))])
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi"})
    assert call.payload.tokens_unavailable is True and result.payload.tokens_unavailable is True


async def test_rate_limit_then_success() -> None:
    """A 429 is retried by the SDK; the job succeeds with one recorded call."""
    provider = FakeProvider(
        [
            Scripted(
                status=429,
                body={"error": {"message": "slow down", "type": "rate_limit"}},
                headers={"retry-after-ms": "10"},
            ),
            Scripted(body=completion(chat_usage(10, 2))),
        ]
    )
    with serving(provider) as url:
        calls, result = await run(url, {"prompt": "hi"})
    assert len(provider.requests) == 2 and len(calls) == 1 and result.payload.success


async def test_responses_api_usage() -> None:
    """The Responses API's input/output details map to the same buckets."""
    provider = FakeProvider([Scripted(body=RESPONSES_BODY)])
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi", "api": "responses"})
    assert buckets(call.payload) == (100, 800, 120, 64)
    assert result.payload.success

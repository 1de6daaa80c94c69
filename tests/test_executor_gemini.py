"""The Gemini executor on the real google-genai SDK against a local server."""

from __future__ import annotations

from typing import Any

import pytest

from shared import protocol as p
from tests.fakeprovider import FakeProvider, Scripted, run_offer, serving

pytest.importorskip("google.genai")

MODEL = "gemini-2.5-flash"


def response(usage: dict[str, int] | None, finish: str = "STOP") -> dict[str, Any]:
    """A generateContent response body."""
    body: dict[str, Any] = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "ok"}]},
                "finishReason": finish,
                "index": 0,
            }
        ],
        "modelVersion": MODEL,
    }
    if usage is not None:
        body["usageMetadata"] = usage
    return body


async def run(base_url: str, spec: dict[str, Any]) -> tuple[list[p.JobGeneration], p.JobResult]:
    """Run one job through the real runner and executor; return its frames."""
    from daemon.executors.gemini import GeminiExecutor

    return await run_offer(
        GeminiExecutor({"base_url": base_url, "api_key": "test"}), "gemini", MODEL, spec
    )


def buckets(g: Any) -> tuple[Any, ...]:
    """(input, cache read, output, reasoning)."""
    return (g.input_tokens, g.cache_read_input_tokens, g.output_tokens, g.reasoning_tokens)


async def test_cached_prompt_and_thinking() -> None:
    """Cached content is subtracted from input; thoughts are added to output."""
    provider = FakeProvider(
        [
            Scripted(
                body=response(
                    {
                        "promptTokenCount": 1000,
                        "cachedContentTokenCount": 600,
                        "candidatesTokenCount": 100,
                        "thoughtsTokenCount": 50,
                        "totalTokenCount": 1150,
                    }
                )
            )
        ]
    )
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi"})
    assert buckets(call.payload) == (400, 600, 150, 50)
    assert buckets(result.payload) == (400, 600, 150, 50)


async def test_response_without_usage() -> None:
    """No usage metadata: unknown, not zero."""
    provider = FakeProvider([Scripted(body=response(None))])
    with serving(provider) as url:
        [call], _ = await run(url, {"prompt": "hi"})
    assert call.payload.tokens_unavailable is True


async def test_stream_takes_last_usage() -> None:
    """A stream takes the last chunk's usage metadata (running totals)."""
    first = response({"promptTokenCount": 10, "candidatesTokenCount": 1})
    first["candidates"][0].pop("finishReason")
    last = response({"promptTokenCount": 10, "candidatesTokenCount": 7})
    provider = FakeProvider([Scripted(events=[("", first), ("", last)])])
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi", "stream": True})
    assert buckets(call.payload) == (10, p.UNSET, 7, p.UNSET)
    assert result.payload.success

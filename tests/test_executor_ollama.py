"""The Ollama executor on the real SDK against a local server in Ollama's wire format."""

from __future__ import annotations

from typing import Any

import pytest

from shared import protocol as p
from tests.fakeprovider import FakeProvider, Scripted, run_offer, serving

pytest.importorskip("ollama")

MODEL = "llama3.2"


def done(prompt: int | None, output: int | None, reason: str = "stop") -> dict[str, Any]:
    """A final chat response (non-streamed body or the stream's done line)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "created_at": "2026-11-23T00:00:00Z",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": reason,
        "total_duration": 1_500_000_000,
        "load_duration": 1000,
    }
    if prompt is not None:
        body["prompt_eval_count"] = prompt
    if output is not None:
        body["eval_count"] = output
    return body


def part(text: str) -> dict[str, Any]:
    """A streamed, not-done chunk."""
    return {
        "model": MODEL,
        "created_at": "2026-11-23T00:00:00Z",
        "message": {"role": "assistant", "content": text},
        "done": False,
    }


async def run(base_url: str, spec: dict[str, Any]) -> tuple[list[p.JobGeneration], p.JobResult]:
    """Run one job through the real runner and executor; return its frames."""
    from daemon.executors.ollama import OllamaExecutor

    return await run_offer(OllamaExecutor({"base_url": base_url}), "ollama", MODEL, spec)


async def test_native_chat_counts_and_local_cost() -> None:
    """prompt_eval_count/eval_count map to input/output; ns durations; cost 0 and local."""
    provider = FakeProvider([Scripted(body=done(26, 298))])
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi", "system": "terse"})
    g = call.payload
    assert (g.input_tokens, g.output_tokens, g.cache_read_input_tokens) == (26, 298, p.UNSET)
    assert (g.cost_usd, g.cost_source, g.duration_ms) == (0.0, "local", 1500.0)
    assert (result.payload.cost_usd, result.payload.cost_source) == (0.0, "local")
    assert provider.requests[0]["messages"][0] == {"role": "system", "content": "terse"}


async def test_stream_takes_the_done_chunk() -> None:
    """A stream's usage is the done chunk's counts."""
    provider = FakeProvider([Scripted(ndjson=[part("he"), part("llo"), done(10, 2)])])
    with serving(provider) as url:
        [call], _ = await run(url, {"prompt": "hi", "stream": True})
    assert (call.payload.input_tokens, call.payload.output_tokens) == (10, 2)


async def test_stream_cut_before_done() -> None:
    """No done chunk: the call is recorded as unavailable and the job fails."""
    provider = FakeProvider([Scripted(ndjson=[part("he"), part("llo"), done(10, 2)], cut_after=2)])
    with serving(provider) as url:
        [call], result = await run(url, {"prompt": "hi", "stream": True})
    assert call.payload.tokens_unavailable is True
    assert not result.payload.success


async def test_response_without_counts_is_unknown() -> None:
    """A final response without counts: unknown, not zero."""
    provider = FakeProvider([Scripted(body=done(None, None))])
    with serving(provider) as url:
        [call], _ = await run(url, {"prompt": "hi"})
    assert call.payload.tokens_unavailable is True and call.payload.input_tokens is p.UNSET

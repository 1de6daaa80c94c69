"""One agent loop on every tool-calling executor: a job whose first response asks for a tool
and whose second answers. Through the official SDKs against local servers in each provider's
wire format, a real `tally serve` and `tallyd`, and PostgreSQL: the ledger holds 2 calls and
1 tool call (duration and sizes, never the arguments), the job's totals equal its calls' sums
bucket by bucket, and the job's output is the second response's text."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import TallyClient
from shared import protocol as p
from tests.conftest import scaled
from tests.fakeprovider import FakeProvider, Scripted, serving
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    running_service,
    start_daemon,
    stop_daemon_async,
    submit_early,
    ws_url,
)

ANSWER = "It is noon in UTC."
GPT = "gpt-4.1-mini"


def openai_usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def chat(message: dict[str, Any], finish: str, usage: dict[str, Any]) -> Scripted:
    return Scripted(
        body={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": GPT,
            "choices": [{"index": 0, "finish_reason": finish, "message": message}],
            "usage": usage,
        }
    )


TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "current_time", "arguments": "{}"},
}


def chat_script() -> list[Scripted]:
    return [
        chat(
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            "tool_calls",
            openai_usage(120, 14, cached=64),
        ),
        chat({"role": "assistant", "content": ANSWER}, "stop", openai_usage(160, 9, cached=128)),
    ]


def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[str, dict[str, Any]]:
    return "", {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": GPT,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "", {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": GPT,
        "choices": [],
        "usage": usage,
    }


def chat_stream_script() -> list[Scripted]:
    call_start = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "current_time", "arguments": ""},
    }
    call_rest = {"index": 0, "function": {"arguments": "{}"}}
    return [
        Scripted(
            events=[
                chunk({"role": "assistant", "tool_calls": [call_start]}),
                chunk({"tool_calls": [call_rest]}),
                chunk({}, "tool_calls"),
                usage_chunk(openai_usage(120, 14, cached=64)),
            ]
        ),
        Scripted(
            events=[
                chunk({"role": "assistant", "content": "It is noon"}),
                chunk({"content": " in UTC."}),
                chunk({}, "stop"),
                usage_chunk(openai_usage(160, 9, cached=128)),
            ]
        ),
    ]


def response(output: list[dict[str, Any]], usage: tuple[int, int, int]) -> dict[str, Any]:
    prompt, completion, cached = usage
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": GPT,
        "status": "completed",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


FUNCTION_CALL = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "current_time",
    "arguments": "{}",
    "status": "completed",
}
MESSAGE = {
    "type": "message",
    "id": "msg_1",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": ANSWER, "annotations": []}],
}


def responses_bodies() -> list[dict[str, Any]]:
    return [response([FUNCTION_CALL], (120, 14, 64)), response([MESSAGE], (160, 9, 128))]


def responses_script() -> list[Scripted]:
    return [Scripted(body=b) for b in responses_bodies()]


def responses_stream_script() -> list[Scripted]:
    def events(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        started = {**body, "status": "in_progress", "output": [], "usage": None}
        return [
            (
                "response.created",
                {"type": "response.created", "sequence_number": 0, "response": started},
            ),
            (
                "response.completed",
                {"type": "response.completed", "sequence_number": 1, "response": body},
            ),
        ]

    return [Scripted(events=events(b)) for b in responses_bodies()]


def ollama_body(message: dict[str, Any], prompt: int, output: int) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "created_at": "2026-12-01T00:00:00Z",
        "message": message,
        "done": True,
        "done_reason": "stop",
        "total_duration": 250_000_000,
        "prompt_eval_count": prompt,
        "eval_count": output,
    }


OLLAMA_CALL = {"function": {"name": "current_time", "arguments": {}}}


def ollama_script() -> list[Scripted]:
    return [
        Scripted(
            body=ollama_body(
                {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL]}, 120, 14
            )
        ),
        Scripted(body=ollama_body({"role": "assistant", "content": ANSWER}, 160, 9)),
    ]


def ollama_stream_script() -> list[Scripted]:
    def part(text: str) -> dict[str, Any]:
        return {
            "model": "llama3.2",
            "created_at": "2026-12-01T00:00:00Z",
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    return [
        Scripted(
            ndjson=[
                {
                    **part(""),
                    "message": {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL]},
                },
                ollama_body({"role": "assistant", "content": ""}, 120, 14),
            ]
        ),
        Scripted(
            ndjson=[
                part("It is noon"),
                part(" in UTC."),
                ollama_body({"role": "assistant", "content": ""}, 160, 9),
            ]
        ),
    ]


def gemini_body(parts: list[dict[str, Any]], prompt: int, output: int, cached: int) -> Scripted:
    return Scripted(
        body={
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": prompt,
                "candidatesTokenCount": output,
                "cachedContentTokenCount": cached,
                "totalTokenCount": prompt + output,
            },
            "modelVersion": "gemini-2.5-flash",
        }
    )


def gemini_script() -> list[Scripted]:
    return [
        gemini_body([{"functionCall": {"name": "current_time", "args": {}}}], 120, 14, 64),
        gemini_body([{"text": ANSWER}], 160, 9, 128),
    ]


@dataclass(frozen=True)
class Case:
    executor: str
    model: str
    spec: dict[str, Any]
    script: Callable[[], list[Scripted]]
    config: Callable[[str], dict[str, Any]]
    # Where the second request carries the tool's answer.
    tool_answer: Callable[[dict[str, Any]], Any]


def _openai(url: str) -> dict[str, Any]:
    return {"base_url": url + "/v1", "api_key": "test", "max_retries": 0}


def _chat_answer(body: dict[str, Any]) -> Any:
    """The tool message (Chat Completions and Ollama alike)."""
    return next(m for m in body["messages"] if m["role"] == "tool")


def _responses_answer(body: dict[str, Any]) -> Any:
    return next(i for i in body["input"] if i.get("type") == "function_call_output")


def _gemini_answer(body: dict[str, Any]) -> Any:
    return body["contents"][2]["parts"][0]["functionResponse"]


PROMPT = {"prompt": "What time is it?", "tools": ["current_time"]}
CASES = {
    "openai-chat": Case("openai", GPT, PROMPT, chat_script, _openai, _chat_answer),
    "openai-chat-stream": Case(
        "openai", GPT, {**PROMPT, "stream": True}, chat_stream_script, _openai, _chat_answer
    ),
    "openai-responses": Case(
        "openai",
        GPT,
        {**PROMPT, "api": "responses"},
        responses_script,
        _openai,
        _responses_answer,
    ),
    "openai-responses-stream": Case(
        "openai",
        GPT,
        {**PROMPT, "api": "responses", "stream": True},
        responses_stream_script,
        _openai,
        _responses_answer,
    ),
    "ollama": Case(
        "ollama", "llama3.2", PROMPT, ollama_script, lambda url: {"base_url": url}, _chat_answer
    ),
    "ollama-stream": Case(
        "ollama",
        "llama3.2",
        {**PROMPT, "stream": True},
        ollama_stream_script,
        lambda url: {"base_url": url},
        _chat_answer,
    ),
    "gemini": Case(
        "gemini",
        "gemini-2.5-flash",
        PROMPT,
        gemini_script,
        lambda url: {"base_url": url, "api_key": "test"},
        _gemini_answer,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_tool_loop(name: str, db_url: str, tmp_path: Path) -> None:
    """Call, tool, call: two calls and one tool call in the ledger; totals = calls' sums."""
    case = CASES[name]
    pytest.importorskip(
        {"openai": "openai", "ollama": "ollama", "gemini": "google.genai"}[case.executor]
    )
    provider = FakeProvider(case.script())
    with serving(provider) as url:
        async with running_service(db_url) as service:
            config = json.dumps(case.config(url))
            daemon = start_daemon(
                ws_url(service), tmp_path / "d", "--executor", f"{case.executor}={config}"
            )
            try:
                async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                    [job_id] = await submit_early(
                        client,
                        [p.JobSpec(executor=case.executor, model=case.model, spec=case.spec)],
                    )
                    final = (await client.wait([job_id], timeout=scaled(60)))[job_id]
            finally:
                await stop_daemon_async(daemon)
    assert final.status == "succeeded", final
    assert final.output == ANSWER
    assert len(provider.requests) == 2
    # The loop answered the tool: its result went back to the model in the second request.
    answer = case.tool_answer(provider.requests[1])
    assert "T" in json.dumps(answer) and ":" in json.dumps(answer)
    calls = await fetch(
        db_url,
        "SELECT c.* FROM llm_calls c JOIN executions e ON e.id = c.execution_id"
        " WHERE e.job_id = $1 ORDER BY seq",
        job_id,
    )
    tools = await fetch(
        db_url,
        "SELECT t.* FROM tool_calls t JOIN executions e ON e.id = t.execution_id"
        " WHERE e.job_id = $1",
        job_id,
    )
    assert len(calls) == 2 and len(tools) == 1
    [tool] = tools
    assert tool["name"] == "current_time" and not tool["error"]
    assert tool["after_call"] == 0 and tool["duration_ms"] >= 0
    assert tool["arguments_bytes"] == 2  # "{}"
    assert tool["result_bytes"] == len("2026-12-01T00:00:00+00:00")
    [job] = await fetch(db_url, "SELECT * FROM jobs WHERE id = $1", job_id)
    [execution] = await fetch(
        db_url, "SELECT output, output_format FROM executions WHERE job_id = $1", job_id
    )
    assert (execution["output"], execution["output_format"]) == (ANSWER, "text")
    for bucket in (
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "reasoning_tokens",
    ):
        known = [c[bucket] for c in calls if c[bucket] is not None]
        assert job[bucket] == (sum(known) if known else None), bucket


async def test_limits_stop_a_tool_loop_and_unknown_tools_are_answered_as_errors() -> None:
    """maxTurns counts calls in a loop that never stops asking; a tool the spec did not offer
    is answered to the model as an error (and reported as a failed tool call), not run."""
    pytest.importorskip("openai")
    from daemon.executors.openai import OpenAIExecutor
    from daemon.runner import run_job

    asks = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
    rogue = {**TOOL_CALL, "id": "call_2", "function": {"name": "rm_rf", "arguments": "{}"}}
    provider = FakeProvider(
        [
            chat(asks, "tool_calls", openai_usage(10, 2)),
            chat({**asks, "tool_calls": [rogue]}, "tool_calls", openai_usage(20, 2)),
            chat(asks, "tool_calls", openai_usage(30, 2)),
        ]
    )
    frames: list[Any] = []

    async def emit(frame: Any) -> None:
        frames.append(frame)

    with serving(provider) as url:
        executor = OpenAIExecutor(_openai(url))
        offer = p.make(
            p.JobOffer,
            p.OfferPayload(
                job_id=p.new_id(),
                attempt=1,
                executor="openai",
                model=GPT,
                spec=PROMPT,
                limits=p.Limits(max_turns=2),
            ),
        )
        result = await run_job(executor, offer, emit)
        await executor.client.close()
    assert len(provider.requests) == 2
    assert result.payload.stop_reason == "max_turns" and result.payload.num_turns == 2
    tools = [f.payload for f in frames if isinstance(f, p.JobTool)]
    assert [(t.seq, t.name, t.error, t.after_call) for t in tools] == [
        (0, "current_time", False, 0),
        (1, "rm_rf", True, 1),
    ]
    answered = _chat_answer(provider.requests[1])
    assert answered["tool_call_id"] == "call_1"
    assert result.payload.input_tokens == 30  # the two calls made, nothing for the third

"""Provider faults on the daemon (issue 25, items 1-4 and 17): whatever a provider answers, the
attempt ends in a frame the orchestrator accepts.

Through the real anthropic, openai and google-genai SDKs (their retries off) against
tests/fakeprovider.py, the real runner, and the orchestrator's own decoder; then one run
through a real ``tally serve`` and a real ``tallyd``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.executors import JobContext, LLMCall, Outcome, StreamCutError
from daemon.executors.base import ToolRun
from daemon.failures import classify
from daemon.runner import generation_frame, result_frame, run_job, tool_frame
from orchestrator.client import TallyClient
from shared import protocol as p
from shared.limits import MAX_NAME, MAX_RETRY_AFTER_MS, MAX_TEXT
from shared.usage import Usage
from tests.conftest import scaled
from tests.fakeprovider import FakeProvider, Scripted, run_offer, serving
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    running_service,
    start_daemon,
    stop_daemon_async,
    submit_early,
    ws_url,
)

pytest.importorskip("anthropic")
pytest.importorskip("openai")

GPT = "gpt-4.1-mini"
CLAUDE = "claude-sonnet-4-6"
HUGE = "E" * 100_000  # a proxy's page, a verbose 400


def decodes(frame: Any) -> Any:
    """The frame as the orchestrator decodes it (raises ProtocolError if it would refuse it)."""
    return p.decode_daemon_frame(p.encode(frame))


async def run(
    name: str, url: str, spec: dict[str, Any] | None = None, limits: p.Limits | None = None
) -> tuple[list[Any], Any]:
    """One job through the real runner and the named executor, its SDK's retries off."""
    spec = spec or {"prompt": "hi"}
    if name == "anthropic":
        from daemon.executors.anthropic import AnthropicExecutor

        executor: Any = AnthropicExecutor({"base_url": url, "api_key": "t", "max_retries": 0})
        return await run_offer(executor, "anthropic", CLAUDE, spec, limits)
    if name == "gemini":
        from daemon.executors.gemini import GeminiExecutor

        executor = GeminiExecutor({"base_url": url, "api_key": "t"})
        return await run_offer(executor, "gemini", "gemini-2.5-flash", spec, limits)
    from daemon.executors.openai import OpenAIExecutor

    executor = OpenAIExecutor({"base_url": url + "/v1", "api_key": "t", "max_retries": 0})
    return await run_offer(executor, "openai", GPT, spec, limits)


def error_body(name: str, message: str) -> dict[str, Any]:
    """An error answer in the provider's shape."""
    if name == "anthropic":
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    return {"error": {"message": message, "type": "server_error", "code": None}}


def chat(model: Any = GPT, finish: Any = "stop", usage: dict[str, Any] | None = None) -> Any:
    """A Chat Completions body."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


# --- item 1: a huge error answer --------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("name", ["anthropic", "openai"])
async def test_huge_error_body_gives_a_valid_result_cut_and_marked(name: str, status: int) -> None:
    """A 100 KB error answer: a job:result the orchestrator decodes, its error text cut to the
    wire's limit and marked cut; 400 is permanent, 500 retryable."""
    provider = FakeProvider([Scripted(status=status, body=error_body(name, HUGE))])
    with serving(provider) as url:
        calls, result = await run(name, url)
    assert calls == []
    payload = decodes(result).payload
    assert payload.success is False and payload.stop_reason == "error"
    message = payload.error_message
    assert isinstance(message, str) and len(message) <= MAX_TEXT
    assert "EEEE" in message and "… [cut: " in message and message.endswith(" bytes]")
    assert payload.error_class == ("permanent" if status == 400 else "retryable")


# --- item 2: a retry-after that is not one ----------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("soon", None),
        ("2s", None),
        ("1e400", None),
        ("nan", None),
        ("-5", None),
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER_MS),
        ("1e300", MAX_RETRY_AFTER_MS),
        ("Mon, 01 Jan 2001 00:00:00 GMT", None),
        ("3", 3000.0),
    ],
)
@pytest.mark.parametrize(("name", "status"), [("anthropic", 429), ("openai", 503)])
async def test_garbage_retry_after_never_raises(
    name: str, status: int, header: str, expected: float | None
) -> None:
    """A 429/503 whose retry-after is garbage, negative, infinite or far away still ends in a
    retryable result, with a sane retryAfterMs (bounded by MAX_RETRY_AFTER_MS) or none."""
    provider = FakeProvider(
        [
            Scripted(
                status=status,
                body=error_body(name, "slow down"),
                headers={"retry-after": header},
            )
        ]
    )
    with serving(provider) as url:
        _, result = await run(name, url)
    payload = decodes(result).payload
    assert payload.success is False and payload.error_class == "retryable"
    assert payload.retry_after_ms == (p.UNSET if expected is None else expected)


def test_classify_is_total() -> None:
    """classify() answers for any exception, even one whose attributes raise when read."""

    class Hostile(Exception):
        @property
        def response(self) -> Any:
            raise RuntimeError("no")

        @property
        def status_code(self) -> Any:
            raise RuntimeError("no")

    assert classify(Hostile()) == ("permanent", None)


# --- item 3: a usage that contradicts itself --------------------------------------------------


async def test_openai_cached_above_prompt_is_recorded_flagged() -> None:
    """Chat Completions with cached_tokens > prompt_tokens: the call is recorded, input and
    cache read unknown (never clamped), output kept, cost unknown, the call flagged."""
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 7,
        "total_tokens": 107,
        "prompt_tokens_details": {"cached_tokens": 150},
    }
    provider = FakeProvider([Scripted(body=chat(usage=usage))])
    with serving(provider) as url:
        [call], result = await run("openai", url)
    g = decodes(call).payload
    assert (g.input_tokens, g.cache_read_input_tokens, g.output_tokens) == (p.UNSET, p.UNSET, 7)
    assert g.usage_inconsistent is True and g.tokens_unavailable is p.UNSET
    assert g.cost_usd is p.UNSET and g.cost_source == "unpriced"
    r = decodes(result).payload
    assert r.success is True and r.output_tokens == 7 and r.input_tokens is p.UNSET


async def test_openai_responses_cached_above_prompt_is_recorded_flagged() -> None:
    """The Responses API likewise: recorded, the input side unknown, flagged."""
    body = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": GPT,
        "status": "completed",
        "output": [],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 10,
            "output_tokens": 5,
            "total_tokens": 15,
            "input_tokens_details": {"cached_tokens": 11},
            "output_tokens_details": {"reasoning_tokens": 2},
        },
    }
    provider = FakeProvider([Scripted(body=body)])
    with serving(provider) as url:
        [call], result = await run("openai", url, {"prompt": "hi", "api": "responses"})
    g = decodes(call).payload
    assert (g.input_tokens, g.cache_read_input_tokens) == (p.UNSET, p.UNSET)
    assert (g.output_tokens, g.reasoning_tokens, g.usage_inconsistent) == (5, 2, True)
    assert decodes(result).payload.success is True


async def test_gemini_cached_above_prompt_is_recorded_flagged() -> None:
    """Gemini's cachedContentTokenCount above promptTokenCount: recorded (output = candidates
    + thoughts kept), the input side unknown, the call flagged."""
    pytest.importorskip("google.genai")
    body = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "ok"}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "modelVersion": "gemini-2.5-flash",
        "usageMetadata": {
            "promptTokenCount": 100,
            "cachedContentTokenCount": 600,
            "candidatesTokenCount": 10,
            "thoughtsTokenCount": 4,
            "totalTokenCount": 114,
        },
    }
    provider = FakeProvider([Scripted(body=body)])
    with serving(provider) as url:
        [call], result = await run("gemini", url)
    g = decodes(call).payload
    assert (g.input_tokens, g.cache_read_input_tokens) == (p.UNSET, p.UNSET)
    assert (g.output_tokens, g.reasoning_tokens, g.usage_inconsistent) == (14, 4, True)
    assert decodes(result).payload.success is True


async def test_anthropic_negative_count_is_unknown_and_flagged() -> None:
    """An Anthropic usage with a negative count: that bucket unknown, the rest kept, flagged."""
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": CLAUDE,
        "content": [{"type": "text", "text": "done"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": -3, "output_tokens": 9},
    }
    provider = FakeProvider([Scripted(body=body)])
    with serving(provider) as url:
        [call], result = await run("anthropic", url)
    g = decodes(call).payload
    assert (g.input_tokens, g.output_tokens, g.usage_inconsistent) == (p.UNSET, 9, True)
    assert decodes(result).payload.success is True


# --- a usage that contradicts itself still counts against the job's limits -------------------

TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "current_time", "arguments": "{}"},
}
TOOL_SPEC = {"prompt": "What time is it?", "tools": ["current_time"]}


def asks_for_a_tool(name: str, completion: int) -> Scripted:
    """A call asking for a tool, whose usage reports 50 cached tokens above a 10-token prompt
    (a server that reports the prompt without its cached part)."""
    if name == "gemini":
        return Scripted(
            body={
                "candidates": [
                    {
                        "content": {
                            "role": "model",
                            "parts": [{"functionCall": {"name": "current_time", "args": {}}}],
                        },
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "modelVersion": "gemini-2.5-flash",
                "usageMetadata": {
                    "promptTokenCount": 10,
                    "cachedContentTokenCount": 50,
                    "candidatesTokenCount": completion,
                    "totalTokenCount": 10 + completion,
                },
            }
        )
    body = chat(
        finish="tool_calls",
        usage={
            "prompt_tokens": 10,
            "completion_tokens": completion,
            "total_tokens": 10 + completion,
            "prompt_tokens_details": {"cached_tokens": 50},
        },
    )
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [TOOL_CALL],
    }
    return Scripted(body=body)


@pytest.mark.parametrize("name", ["openai", "gemini"])
async def test_inconsistent_usage_still_counts_against_budget_usd(name: str) -> None:
    """A tool loop whose every call reports cached above prompt, on a priced model, with a
    budgetUsd below one call's worst case: the job stops (budget) after its first call,
    counted at its upper bound (prompt + cached at the worst input rate, plus its output),
    while the call's recorded cost stays unknown and the call flagged."""
    if name == "gemini":
        pytest.importorskip("google.genai")
    provider = FakeProvider([asks_for_a_tool(name, 1000) for _ in range(5)])
    limits = p.Limits(budget_usd=0.001, max_turns=5)
    with serving(provider) as url:
        [call], result = await run(name, url, TOOL_SPEC, limits)
    assert len(provider.requests) == 1
    g = decodes(call).payload
    assert (g.usage_inconsistent, g.output_tokens, g.cost_usd) == (True, 1000, p.UNSET)
    r = decodes(result).payload
    assert (r.stop_reason, r.num_turns, r.cost_usd) == ("budget", 1, p.UNSET)


async def test_inconsistent_usage_still_counts_against_max_total_tokens() -> None:
    """maxTotalTokens 150, calls of 10 prompt + 50 cached (contradicting) + 100 output: the
    first call counts 160 (its input bound, not 0), so the job stops after it."""
    provider = FakeProvider([asks_for_a_tool("openai", 100) for _ in range(3)])
    limits = p.Limits(max_total_tokens=150, max_turns=3)
    with serving(provider) as url:
        [call], result = await run("openai", url, TOOL_SPEC, limits)
    assert len(provider.requests) == 1
    assert decodes(call).payload.input_tokens is p.UNSET
    assert decodes(result).payload.stop_reason == "max_total_tokens"


async def test_partly_unknown_usage_is_unpriced_and_counted_at_its_bound() -> None:
    """Review 2, finding 9: a usage with the prompt but no completion_tokens is never priced
    with its output as 0: the call's cost is unknown (unpriced), and a tool loop with a small
    budgetUsd counts it at its upper bound (its output cap), so it stops after that call."""
    body = chat(finish="tool_calls", usage={"prompt_tokens": 100})
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [TOOL_CALL],
    }
    provider = FakeProvider([Scripted(body=body) for _ in range(5)])
    limits = p.Limits(budget_usd=0.001, max_turns=5)
    with serving(provider) as url:
        calls, result = await run("openai", url, TOOL_SPEC, limits)
    assert len(provider.requests) == 1 and len(calls) == 1
    g = decodes(calls[0]).payload
    assert (g.input_tokens, g.output_tokens) == (100, p.UNSET)
    assert (g.cost_usd, g.cost_source) == (p.UNSET, "unpriced")
    r = decodes(result).payload
    assert (r.stop_reason, r.num_turns, r.cost_usd) == ("budget", 1, p.UNSET)


# --- item 4: names a server got wrong ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "finish"),
    [("", ""), ("m" * 300, "f" * 300), (None, None), ("a\x00b", "stop")],
)
async def test_empty_or_long_model_and_finish_reason_are_mapped(model: Any, finish: Any) -> None:
    """An OpenAI-compatible server's empty or 300-character model / finish reason: the call is
    recorded, empty names omitted (the call attributed to the requested model), long ones cut
    to 256 characters and marked; NUL replaced as the orchestrator stores it."""
    provider = FakeProvider([Scripted(body=chat(model=model, finish=finish))])
    with serving(provider) as url:
        [call], result = await run("openai", url)
    g = decodes(call).payload
    assert g.request_model == GPT and g.input_tokens == 10
    if not model:
        assert g.response_model is p.UNSET and g.finish_reason is p.UNSET
    elif len(model) > MAX_NAME:
        assert len(g.response_model) == MAX_NAME and g.response_model.endswith("…")
        assert len(g.finish_reason) == MAX_NAME and g.finish_reason.startswith("fff")
    else:
        assert g.response_model == "a\ufffdb"
    r = decodes(result).payload
    assert r.success is True and r.model_usage is not p.UNSET
    assert all(1 <= len(e.model) <= MAX_NAME for e in r.model_usage)


# --- item 17: whose timeout is it -------------------------------------------------------------


class _Raises:
    """An executor that raises what it is given after its call (a stand-in for an SDK)."""

    name = "raises"
    models: ClassVar[list[str]] = []

    def __init__(self, exc: BaseException | None, sleep: float = 0.0) -> None:
        self.exc, self.sleep = exc, sleep

    def validate(self, spec: dict[str, Any], model: str | None) -> None:
        """Any spec."""

    async def run(self, ctx: JobContext) -> Outcome:
        """Sleep, then raise."""
        await asyncio.sleep(self.sleep)
        if self.exc is not None:
            raise self.exc
        return Outcome()


async def _run_raising(executor: Any, timeout_ms: int) -> p.JobResult:
    offer = p.make(
        p.JobOffer,
        p.OfferPayload(
            job_id=p.new_id(),
            attempt=1,
            executor="raises",
            limits=p.Limits(timeout_ms=timeout_ms),
        ),
    )

    async def emit(_frame: Any) -> None:
        return None

    return await run_job(executor, offer, emit)


async def test_timeout_inside_an_sdk_is_a_retryable_provider_fault() -> None:
    """A TimeoutError or a stream cut raised inside an SDK, well before the job's timeoutMs,
    is a retryable provider fault with stopReason error, not the job's own timeout."""
    for exc in (TimeoutError("read timed out"), StreamCutError("stream ended early")):
        payload = (await _run_raising(_Raises(exc), timeout_ms=60_000)).payload
        assert (payload.stop_reason, payload.error_class) == ("error", "retryable"), exc


async def test_an_exception_nothing_can_read_still_ends_in_a_result() -> None:
    """An executor raising an exception whose attributes and text raise when read: the run
    still ends in a job:result the orchestrator decodes (permanent, the class named)."""

    class Unreadable(Exception):
        @property
        def status_code(self) -> Any:
            raise RuntimeError("no")

        def __str__(self) -> str:
            raise RuntimeError("no")

    result = await _run_raising(_Raises(Unreadable()), timeout_ms=60_000)
    payload = decodes(result).payload
    assert (payload.stop_reason, payload.error_class) == ("error", "permanent")
    assert "Unreadable" in str(payload.error_message)


async def test_the_jobs_own_timeout_is_still_its_timeout() -> None:
    """The job's timeoutMs expiring is stopReason timeout, permanent."""
    payload = (await _run_raising(_Raises(None, sleep=30), timeout_ms=50)).payload
    assert (payload.stop_reason, payload.error_class) == ("timeout", "permanent")


async def test_openai_stream_cut_is_retryable() -> None:
    """A real SDK stream cut before its usage chunk: the call recorded unknown, the attempt a
    retryable failure (stopReason error)."""
    start = ("", {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": GPT})
    delta = {"index": 0, "delta": {"role": "assistant", "content": "he"}, "finish_reason": None}
    provider = FakeProvider([Scripted(events=[(start[0], {**start[1], "choices": [delta]})])])
    with serving(provider) as url:
        [call], result = await run("openai", url, {"prompt": "hi", "stream": True})
    assert call.payload.tokens_unavailable is True
    assert (result.payload.stop_reason, result.payload.error_class) == ("error", "retryable")


def _chat_chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[str, dict[str, Any]]:
    return "", {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": GPT,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _finished_without_usage(name: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """A spec and a whole stream ("hello", then its finish) that carries no usage at all."""
    if name == "openai-chat":
        return {"prompt": "hi", "stream": True}, [
            _chat_chunk({"role": "assistant", "content": "hel"}),
            _chat_chunk({"content": "lo"}),
            _chat_chunk({}, "stop"),
        ]
    if name == "openai-responses":
        body = {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "model": GPT,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "hello", "annotations": []}],
                }
            ],
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
        }
        event = {"type": "response.completed", "sequence_number": 0, "response": body}
        return {"prompt": "hi", "stream": True, "api": "responses"}, [("response.completed", event)]
    part = {"content": {"role": "model", "parts": [{"text": "hello"}]}, "index": 0}
    return {"prompt": "hi", "stream": True}, [
        ("", {"candidates": [part], "modelVersion": "gemini-2.5-flash"}),
        (
            "",
            {
                "candidates": [
                    {**part, "content": {"role": "model", "parts": []}, "finishReason": "STOP"}
                ]
            },
        ),
    ]


@pytest.mark.parametrize("name", ["openai-chat", "openai-responses", "gemini"])
async def test_a_finished_stream_without_usage_is_a_whole_answer(name: str) -> None:
    """A stream that reached its finish but carried no usage (a server that ignores
    stream_options.include_usage): the job succeeds with the answer, the call recorded with
    its tokens unknown (tokensUnavailable), one request; only a stream cut before its finish
    is a StreamCutError."""
    if name == "gemini":
        pytest.importorskip("google.genai")
    spec, events = _finished_without_usage(name)
    provider = FakeProvider([Scripted(events=events)])
    with serving(provider) as url:
        [call], result = await run(name.partition("-")[0], url, spec)
    assert len(provider.requests) == 1
    g = decodes(call).payload
    assert g.tokens_unavailable is True and g.input_tokens is p.UNSET
    r = decodes(result).payload
    assert (r.success, r.stop_reason, r.output) == (True, "end_turn", "hello")
    assert r.tokens_unavailable is True


# --- the rule: every frame the daemon builds decodes ------------------------------------------

_CHARS = st.sampled_from(["a", "é", "\x00", "\x01", "\ud800", "\udfff", "😀", " ", '"', "\\"])
_HOSTILE_TEXT = st.one_of(
    st.none(),
    st.text(_CHARS, max_size=40),
    st.sampled_from(["", "x" * 300, "\x01" * 70_000, "y" * 70_000]),
    st.integers(),
)
_NUMBERS = st.one_of(
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
_COUNTS = st.one_of(st.none(), st.integers(min_value=-(2**64), max_value=2**64))


@st.composite
def _calls(draw: st.DrawFn) -> LLMCall:
    return LLMCall(
        provider=draw(_HOSTILE_TEXT),
        request_model=draw(_HOSTILE_TEXT),
        response_model=draw(_HOSTILE_TEXT),
        usage=Usage(*(draw(_COUNTS) for _ in range(5))),
        finish_reason=draw(_HOSTILE_TEXT),
        cost_usd=draw(_NUMBERS),
        cost_source=draw(st.sampled_from([None, "provider", "price_table", "bogus"])),
        duration_ms=draw(_NUMBERS),
        request_id=draw(_HOSTILE_TEXT),
        cache_creation_1h=draw(_COUNTS),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(_calls(), max_size=4),
    error=_HOSTILE_TEXT,
    stop=st.sampled_from(["end_turn", "error", "", "nonsense"]),
    error_class=st.sampled_from([None, "retryable", "permanent", "bogus"]),
    turns=st.one_of(st.none(), st.integers(min_value=-5, max_value=2**40)),
    retry_after=_NUMBERS,
    output=st.one_of(
        st.none(),
        st.text(_CHARS, max_size=50),
        st.recursive(st.text(_CHARS, max_size=5), lambda s: st.dictionaries(st.just("k"), s)),
    ),
    tool_name=_HOSTILE_TEXT,
)
def test_frames_built_from_hostile_values_always_decode(
    calls: list[LLMCall],
    error: Any,
    stop: str,
    error_class: str | None,
    turns: int | None,
    retry_after: Any,
    output: Any,
    tool_name: Any,
) -> None:
    """Whatever an executor or provider hands the runner (empty, huge, NUL, lone surrogates,
    negative or huge counts, NaN and infinite numbers), every job:generation, job:tool and
    job:result it builds decodes with the orchestrator's decoder."""
    eid = p.new_id()
    for seq, call in enumerate(calls):
        decodes(generation_frame(eid, seq, call))
    run = ToolRun(
        name=tool_name if isinstance(tool_name, str) else "",
        after_call=None,
        started_at_ms=1.0,
        duration_ms=float("nan"),
        arguments_bytes=-1,
        result_bytes=2**80,
        error=True,
    )
    decodes(tool_frame(eid, 0, run))
    outcome = Outcome(
        success=error is None,
        error_message=error,
        stop_reason=stop,
        error_class=error_class,
        num_turns=turns,
        retry_after_ms=retry_after,
        output=output if not isinstance(output, dict) else {"k": output},
    )
    fitted = [c.fitted() for c in calls]
    decodes(result_frame(eid, fitted, outcome, float("inf")))
    # A deeply nested answer travels as its text rather than breaking the frame.
    deep: Any = "x"
    for _ in range(200):
        deep = {"k": deep}
    decodes(result_frame(eid, [], Outcome(output=deep), 1.0))


def test_many_models_cut_to_one_name_still_decode() -> None:
    """Two 300-character models sharing their first 255 characters are cut to one name: their
    per-model entries merge instead of repeating a model (which the decoder refuses)."""
    base = "m" * 299
    calls = [
        LLMCall("openai", base + "a", None, Usage(1, 1)).fitted(),
        LLMCall("openai", base + "b", None, Usage(2, 2)).fitted(),
    ]
    payload = decodes(result_frame(p.new_id(), calls, Outcome(), 1.0)).payload
    assert len(payload.model_usage) == 1 and payload.model_usage[0].input_tokens == 3


# --- end to end: a real tally serve and a real tallyd -----------------------------------------


async def test_huge_error_through_tallyd_ends_the_job(db_url: str, tmp_path: Path) -> None:
    """A provider answering a 100 KB 500 to every call: through a real tallyd (real openai
    SDK) and a real tally serve, the job is retried, then failed, within seconds; no attempt
    stays running, and the stored error is the cut one."""
    provider = FakeProvider(
        [Scripted(status=500, body=error_body("openai", HUGE)) for _ in range(2)]
    )
    with serving(provider) as url:
        async with running_service(db_url) as service:
            config = json.dumps({"base_url": url + "/v1", "api_key": "t", "max_retries": 0})
            daemon = start_daemon(ws_url(service), tmp_path / "d", "--executor", f"openai={config}")
            try:
                async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                    [job_id] = await submit_early(
                        client,
                        [
                            p.JobSpec(
                                executor="openai", model=GPT, spec={"prompt": "hi"}, max_attempts=2
                            )
                        ],
                    )
                    final = (await client.wait([job_id], timeout=scaled(60)))[job_id]
            finally:
                await stop_daemon_async(daemon)
    assert final.status == "failed", final
    rows = await fetch(
        db_url,
        "SELECT status, error_class, error FROM executions WHERE job_id = $1 ORDER BY attempt",
        job_id,
    )
    assert [(r["status"], r["error_class"]) for r in rows] == [
        ("failed", "retryable"),
        ("failed", "retryable"),
    ]
    assert all("… [cut: " in r["error"] and len(r["error"]) <= MAX_TEXT for r in rows)
    [job] = await fetch(db_url, "SELECT status, attempts FROM jobs WHERE id = $1", job_id)
    assert (job["status"], job["attempts"]) == ("failed", 2)
    assert len(provider.requests) == 2
    running = await fetch(db_url, "SELECT count(*) AS n FROM executions WHERE status = 'running'")
    assert running[0]["n"] == 0


def test_minimal_result_is_what_the_worker_sends() -> None:
    """The daemon's replacement for a refused result decodes whatever the refusal said."""
    from daemon.runner import minimal_result

    frame = minimal_result(p.new_id(), "refused: " + "\ud800\x00" * 50_000)
    payload = decodes(frame).payload
    assert payload.success is False and payload.error_class == "permanent"
    assert msgspec.json.encode(payload.error_message)

"""The Claude Agent SDK executor: the real SDK driving a stand-in ``claude`` CLI."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shared import protocol as p
from tests.fakeprovider import cache_buckets, run_offer

pytest.importorskip("claude_agent_sdk")

SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-haiku-4-5-20251001"
FAKE_CLAUDE = Path(__file__).with_name("fake_claude.py")


def api_usage(inp: int, out: int, read: int = 0, write: int = 0) -> dict[str, Any]:
    """An assistant message's usage as Claude Code prints it (Anthropic's shape)."""
    return {
        "input_tokens": inp,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write, "ephemeral_1h_input_tokens": 0},
        "output_tokens": out,
        "service_tier": "standard",
    }


def assistant(
    mid: str, block: dict[str, Any], usage: dict[str, Any], stop: str | None = None
) -> dict[str, Any]:
    """One stream-json assistant message: one content block of API response ``mid``."""
    return {
        "type": "assistant",
        "message": {
            "model": SONNET,
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": [block],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
            "context_management": None,
        },
        "parent_tool_use_id": None,
    }


def tool_result(tool_use_id: str, text: str) -> dict[str, Any]:
    """The user message carrying a tool's output back to the model."""
    return {
        "type": "user",
        "message": {
            "role": "user",
            "content": [
                {
                    "tool_use_id": tool_use_id,
                    "type": "tool_result",
                    "content": text,
                    "is_error": False,
                }
            ],
        },
        "parent_tool_use_id": None,
        "tool_use_result": {"stdout": text, "stderr": "", "interrupted": False, "isImage": False},
    }


def model_entry(inp: int, out: int, read: int, write: int, cost: float) -> dict[str, Any]:
    """A ``modelUsage`` value as the CLI prints it."""
    return {
        "inputTokens": inp,
        "outputTokens": out,
        "cacheReadInputTokens": read,
        "cacheCreationInputTokens": write,
        "webSearchRequests": 0,
        "costUSD": cost,
        "contextWindow": 200000,
        "maxOutputTokens": 64000,
    }


def result(
    subtype: str = "success",
    model_usage: dict[str, Any] | None = None,
    cost: float | None = 0.0,
    num_turns: int = 2,
    **extra: Any,
) -> dict[str, Any]:
    """The final ``result`` message."""
    message: dict[str, Any] = {
        "type": "result",
        "subtype": subtype,
        "is_error": subtype != "success",
        "duration_ms": 5230,
        "duration_api_ms": 4100,
        "num_turns": num_turns,
        "result": "There are two files." if subtype == "success" else None,
        "stop_reason": "end_turn",
        "usage": api_usage(6, 180, 27800, 4300),
        "permission_denials": [],
        "terminal_reason": "completed",
        **extra,
    }
    if cost is not None:
        message["total_cost_usd"] = cost
    if model_usage is not None:
        message["modelUsage"] = model_usage
    return message


# A two-step agent: list files with Bash (one API response printed as two messages), then answer.
STEP_1 = [
    assistant("msg_01", {"type": "text", "text": "Listing."}, api_usage(3, 2, 13900, 4120)),
    assistant(
        "msg_01",
        {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls"}},
        api_usage(3, 85, 13900, 4120),
        stop="tool_use",
    ),
    tool_result("toolu_01", "a.txt\nb.txt"),
]
STEP_2 = [
    assistant("msg_02", {"type": "text", "text": "Two files."}, api_usage(3, 95, 13900, 180)),
]
MODEL_USAGE = {
    SONNET: model_entry(6, 180, 27800, 4300, 0.0401),
    HAIKU: model_entry(350, 20, 0, 0, 0.00045),
}


def stand_in_cli(tmp_path: Path, scenario: dict[str, Any]) -> dict[str, Any]:
    """Write the stand-in ``claude`` and its scenario; return the executor's config."""
    cli = tmp_path / "claude"
    run = f"runpy.run_path({str(FAKE_CLAUDE)!r}, run_name='__main__')"
    cli.write_text(f"#!{sys.executable}\nimport runpy\n{run}\n")
    cli.chmod(0o755)
    scenario_file = tmp_path / "scenario.json"
    scenario_file.write_text(json.dumps(scenario))
    return {"cli_path": str(cli), "env": {"FAKE_CLAUDE_SCENARIO": str(scenario_file)}}


async def run_agent(
    tmp_path: Path,
    messages: list[dict[str, Any]],
    limits: p.Limits | None = None,
    spec: dict[str, Any] | None = None,
    **scenario: Any,
) -> tuple[list[p.JobGeneration], p.JobResult, list[str]]:
    """Run one job through the runner, the executor, the real SDK and the stand-in CLI."""
    from daemon.executors.claude_agent import ClaudeAgentExecutor

    argv_file = tmp_path / "argv.json"
    executor = ClaudeAgentExecutor(
        stand_in_cli(tmp_path, {"messages": messages, "argvFile": str(argv_file), **scenario})
    )
    frames, final = await run_offer(
        executor, "claude-agent", SONNET, spec or {"prompt": "How many files?"}, limits
    )
    # The SDK leaves its finished subprocess transport to the garbage collector; collect it
    # while this test's loop is still open so that it closes cleanly.
    gc.collect()
    await asyncio.sleep(0)
    argv = json.loads(argv_file.read_text()) if argv_file.exists() else []
    return frames, final, argv


async def test_steps_deduplicated_by_message_id_and_totals_from_model_usage(
    tmp_path: Path,
) -> None:
    """Two messages of one response are one step; the job's totals are the SDK's modelUsage."""
    frames, final, argv = await run_agent(
        tmp_path, [*STEP_1, *STEP_2, result(model_usage=MODEL_USAGE, cost=0.04055)]
    )
    # One generation per API response, its usage counted once (not once per content block),
    # its output the response's final count.
    assert [f.payload.request_id for f in frames] == ["msg_01", "msg_02"]
    assert [f.payload.seq for f in frames] == [0, 1]
    assert cache_buckets(frames[0].payload) == (3, 13900, 4120, 85)
    assert cache_buckets(frames[1].payload) == (3, 13900, 180, 95)
    assert frames[0].payload.finish_reason == "tool_use"
    assert {f.payload.response_model for f in frames} == {SONNET}
    # Steps carry no cost of their own: it is in the SDK's estimate on the result.
    assert {f.payload.cost_usd for f in frames} == {msgspec.UNSET}
    r = final.payload
    assert r.success and r.stop_reason == "end_turn"
    # Totals: both models of modelUsage, including the haiku call the CLI never printed.
    assert cache_buckets(r) == (356, 27800, 4300, 200)
    assert r.cost_usd == pytest.approx(0.04055)
    assert r.cost_source == "sdk_estimate"
    assert r.num_turns == 2
    assert r.model_usage is not msgspec.UNSET
    assert [(e.model, e.input_tokens, e.output_tokens, e.cost_usd) for e in r.model_usage] == [
        (HAIKU, 350, 20, 0.00045),
        (SONNET, 6, 180, 0.0401),
    ]
    assert ["--model", SONNET] == argv[argv.index("--model") : argv.index("--model") + 2]
    assert "--max-turns" not in argv


@pytest.mark.parametrize(
    ("subtype", "stop", "flag", "limits"),
    [
        ("error_max_turns", "max_turns", ["--max-turns", "1"], p.Limits(max_turns=1)),
        (
            "error_max_budget_usd",
            "budget",
            ["--max-budget-usd", "0.01"],
            p.Limits(budget_usd=0.01),
        ),
    ],
)
async def test_sdk_limits_map_to_stop_reasons(
    tmp_path: Path, subtype: str, stop: str, flag: list[str], limits: p.Limits
) -> None:
    """The job's maxTurns and budget go to the CLI; its error subtypes become stopReason."""
    usage = {SONNET: model_entry(3, 85, 13900, 4120, 0.0213)}
    frames, final, argv = await run_agent(
        tmp_path,
        [*STEP_1, result(subtype, model_usage=usage, cost=0.0213, num_turns=1)],
        limits=limits,
    )
    i = argv.index(flag[0])
    assert argv[i : i + 2] == flag
    r = final.payload
    assert (r.success, r.stop_reason, r.error_message) == (True, stop, subtype)
    assert cache_buckets(r) == (3, 13900, 4120, 85)
    assert r.cost_usd == pytest.approx(0.0213)
    assert len(frames) == 1


async def test_execution_error_keeps_usage_and_names_the_cause(tmp_path: Path) -> None:
    """An API error after a step: the job fails with the CLI's message and keeps its spend."""
    usage = {SONNET: model_entry(3, 85, 13900, 4120, 0.0213)}
    _frames, final, _argv = await run_agent(
        tmp_path,
        [
            *STEP_1,
            result(
                "error_during_execution",
                model_usage=usage,
                cost=0.0213,
                errors=["529 Overloaded"],
                api_error_status=529,
            ),
        ],
    )
    r = final.payload
    assert (r.success, r.stop_reason) == (False, "error")
    assert r.error_message == "API error 529: 529 Overloaded"
    assert cache_buckets(r) == (3, 13900, 4120, 85)
    assert r.cost_source == "sdk_estimate"


async def test_result_without_model_usage_uses_its_aggregate_usage(tmp_path: Path) -> None:
    """An older CLI without ``modelUsage``: the result's usage, attributed to the job's model."""
    _frames, final, _argv = await run_agent(tmp_path, [*STEP_1, *STEP_2, result(cost=0.04)])
    r = final.payload
    assert cache_buckets(r) == (6, 27800, 4300, 180)
    assert [e.model for e in r.model_usage] == [SONNET]  # type: ignore[union-attr]


async def test_cli_crash_mid_run_reports_the_steps_it_saw(tmp_path: Path) -> None:
    """The CLI dies before its result: the job fails, and the completed step's usage is kept."""
    frames, final, _argv = await run_agent(tmp_path, STEP_1, after="exit", exitCode=1)
    assert [f.payload.request_id for f in frames] == ["msg_01"]
    r = final.payload
    assert (r.success, r.stop_reason) == (False, "error")
    assert cache_buckets(r) == (3, 13900, 4120, 85)
    assert r.cost_usd is msgspec.UNSET  # no SDK estimate arrived: unknown, not 0


async def test_timeout_flushes_the_step_in_flight(tmp_path: Path) -> None:
    """The CLI hangs mid-run; at the job's timeout the step seen so far is still reported."""
    frames, final, _argv = await run_agent(
        tmp_path, [*STEP_1, *STEP_2], limits=p.Limits(timeout_ms=3000), after="hang"
    )
    assert [f.payload.request_id for f in frames] == ["msg_01", "msg_02"]
    r = final.payload
    assert (r.success, r.stop_reason) == (False, "timeout")
    assert cache_buckets(r) == (6, 27800, 4300, 180)


async def test_token_limit_enforced_per_step(tmp_path: Path) -> None:
    """maxTotalTokens is Tally's own limit: the agent is stopped at the step that passes it."""
    frames, final, _argv = await run_agent(
        tmp_path, [*STEP_1, *STEP_2], limits=p.Limits(max_total_tokens=10000), after="hang"
    )
    assert [f.payload.request_id for f in frames] == ["msg_01"]
    r = final.payload
    assert (r.success, r.stop_reason) == (True, "max_total_tokens")
    assert cache_buckets(r) == (3, 13900, 4120, 85)


async def test_spec_is_checked_before_the_offer_is_taken() -> None:
    """A spec without a prompt, or with bad tools, is refused with the field named."""
    from daemon.executors import SpecError
    from daemon.executors.claude_agent import ClaudeAgentExecutor

    executor = ClaudeAgentExecutor({})
    with pytest.raises(SpecError, match=r"spec\.prompt"):
        executor.validate({}, None)
    with pytest.raises(SpecError, match=r"spec\.allowedTools"):
        executor.validate({"prompt": "x", "allowedTools": "Bash"}, None)
    executor.validate({"prompt": "x", "allowedTools": ["Bash", "Read"]}, None)


async def test_agent_job_through_tallyd_and_the_ledger(db_url: str, tmp_path: Path) -> None:
    """A real tallyd runs the agent: steps land in llm_calls, the SDK's totals in the ledger,
    and the Prometheus counters still equal SUM() over executions."""
    from orchestrator.client import TallyClient
    from tests.conftest import scaled
    from tests.stack import (
        CLIENT_TOKEN,
        fetch,
        http_url,
        running_service,
        start_daemon,
        stop_daemon_async,
        submit_early,
        ws_url,
    )
    from tests.test_ingest import assert_counters_equal_ledger

    config = stand_in_cli(
        tmp_path, {"messages": [*STEP_1, *STEP_2, result(model_usage=MODEL_USAGE, cost=0.04055)]}
    )
    async with running_service(db_url) as service:
        daemon = start_daemon(
            ws_url(service), tmp_path / "d", "--executor", f"claude-agent={json.dumps(config)}"
        )
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                ids = await submit_early(
                    client,
                    [p.JobSpec(executor="claude-agent", model=SONNET, spec={"prompt": "ls"})],
                )
                finals = await client.wait(ids, timeout=scaled(60))
            await assert_counters_equal_ledger(db_url, http_url(service, "/metrics"))
        finally:
            await stop_daemon_async(daemon)
    assert {f.status for f in finals.values()} == {"succeeded"}
    calls = await fetch(db_url, "SELECT request_id, output_tokens FROM llm_calls ORDER BY seq")
    assert [(c["request_id"], c["output_tokens"]) for c in calls] == [
        ("msg_01", 85),
        ("msg_02", 95),
    ]
    row = (
        await fetch(
            db_url,
            "SELECT input_tokens, output_tokens, cost_usd, cost_source, num_turns FROM executions",
        )
    )[0]
    assert (row["input_tokens"], row["output_tokens"], row["num_turns"]) == (356, 200, 2)
    assert (float(row["cost_usd"]), row["cost_source"]) == (0.04055, "sdk_estimate")
    models = await fetch(
        db_url, "SELECT model, input_tokens FROM execution_model_usage ORDER BY model"
    )
    assert [(m["model"], m["input_tokens"]) for m in models] == [(HAIKU, 350), (SONNET, 6)]


async def test_parallel_subagents_do_not_split_or_double_count_steps(tmp_path: Path) -> None:
    """Two sub-agents' messages interleave: each API response is still one step, once."""

    def sub(mid: str, parent: str, block: dict[str, Any], out: int) -> dict[str, Any]:
        return {**assistant(mid, block, api_usage(10, out, 0, 500)), "parent_tool_use_id": parent}

    def task(tid: str) -> dict[str, Any]:
        return {"type": "tool_use", "id": tid, "name": "Task", "input": {"prompt": tid}}

    text = {"type": "text", "text": "looking"}
    messages = [
        assistant("msg_01", task("toolu_A"), api_usage(3, 40, 13900, 4120)),
        assistant("msg_01", task("toolu_B"), api_usage(3, 60, 13900, 4120), stop="tool_use"),
        sub("msg_A1", "toolu_A", text, 5),
        sub("msg_B1", "toolu_B", text, 7),
        sub("msg_A1", "toolu_A", {"type": "text", "text": "A done"}, 30),
        sub("msg_B1", "toolu_B", {"type": "text", "text": "B done"}, 20),
        sub("msg_A1", "toolu_A", {"type": "text", "text": "late repeat"}, 30),
        tool_result("toolu_A", "A says hi"),
        tool_result("toolu_B", "B says hi"),
        *STEP_2,
        result(model_usage=MODEL_USAGE, cost=0.04055),
    ]
    frames, _final, _argv = await run_agent(tmp_path, messages)
    got = sorted((f.payload.request_id, f.payload.output_tokens) for f in frames)
    assert got == [("msg_01", 60), ("msg_02", 95), ("msg_A1", 30), ("msg_B1", 20)]

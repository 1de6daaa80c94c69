"""Tool calls and job output through a real `tally serve` and PostgreSQL, from a daemon that
speaks the protocol step by step: a redelivered `job:tool` is recorded and counted once, one
from a daemon the execution is not assigned to is refused, an answer is cut and flagged to
the orchestrator's cap, a too-deep answer is refused; and the submit-time checks of specs
and executors (nothing written when refused). Plus the pure parts: the cut and the specs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import msgspec
import pytest

from orchestrator.client import RefusedError, TallyClient
from shared import protocol as p
from shared import specs
from shared.output import cut_text, fit
from tests.conftest import scaled
from tests.invariants import scrape_sync
from tests.rawdaemon import RawDaemon
from tests.stack import CLIENT_TOKEN, fetch, http_url, running_service, ws_url


def tool(offer: p.JobOffer, seq: int, name: str = "current_time", error: bool = False) -> Any:
    return p.make(
        p.JobTool,
        p.ToolPayload(
            seq=seq,
            name=name,
            started_at=p.now_ms(),
            duration_ms=12.5,
            after_call=0,
            arguments_bytes=2,
            result_bytes=25,
            error=error,
        ),
        offer.id,
    )


def generation(offer: p.JobOffer, seq: int) -> Any:
    return p.make(
        p.JobGeneration,
        p.GenerationPayload(
            seq=seq,
            provider="simulated",
            response_model="sim-small",
            input_tokens=10,
            output_tokens=5,
        ),
        offer.id,
    )


async def acks(daemon: RawDaemon, n: int) -> list[p.JobAck | p.Error]:
    out: list[Any] = []
    while len(out) < n:
        frame = await daemon.next_of((p.JobAck, p.Error), timeout=scaled(10))  # type: ignore[arg-type]
        out.append(frame)
    return out


async def test_tool_frames_are_idempotent_fenced_and_counted_once(db_url: str) -> None:
    """A job:tool resent is acknowledged again and stored and counted once; one from another
    daemon is answered not_assigned naming job:tool and its seq; the answer reaches the
    watching client in job:update, cut to --max-output-bytes and flagged."""
    async with running_service(db_url, max_output_bytes=1024) as service:
        worker, other = RawDaemon(ws_url(service), "w1"), RawDaemon(ws_url(service), "w2")
        await worker.connect()
        await other.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await client.submit([p.JobSpec(executor="simulated")])
            await client.watch([job_id])
            offer = await worker.next_of(p.JobOffer, timeout=scaled(10))
            await worker.accept(offer)
            await worker.send(generation(offer, 0))
            await worker.send(tool(offer, 0))
            await worker.send(tool(offer, 0))  # redelivered after a reconnect
            await worker.send(tool(offer, 1, "lookup", error=True))
            answers = await acks(worker, 4)
            assert all(isinstance(a, p.JobAck) for a in answers), answers
            assert sorted((a.payload.of, a.payload.seq) for a in answers) == [
                ("job:generation", 0),
                ("job:tool", 0),
                ("job:tool", 0),
                ("job:tool", 1),
            ]
            await other.send(tool(offer, 2))
            [refused] = await acks(other, 1)
            assert isinstance(refused, p.Error) and refused.payload.code == "not_assigned"
            assert (refused.payload.of, refused.payload.seq) == ("job:tool", 2)
            answer = "é" * 2000  # 4,000 bytes: cut to 1,024 at a character boundary
            await worker.send(
                p.make(
                    p.JobResult,
                    p.ResultPayload(success=True, input_tokens=10, output_tokens=5, output=answer),
                    offer.id,
                )
            )
            await acks(worker, 1)
            final = (await client.wait([job_id], timeout=scaled(10)))[job_id]
        assert final.status == "succeeded"
        assert isinstance(final.output, str) and final.output == "é" * 511
        assert final.output_truncated is True
        metrics = await asyncio.to_thread(scrape_sync, http_url(service, "/metrics"))
        await worker.close()
        await other.close()
    counted = {
        (labels["tool"], labels["outcome"]): v for labels, v in metrics["tally_tool_calls_total"]
    }
    assert counted == {("current_time", "ok"): 1.0, ("lookup", "error"): 1.0}
    rows = await fetch(db_url, "SELECT seq, name, error, duration_ms FROM tool_calls ORDER BY seq")
    assert [(r["seq"], r["name"], r["error"], r["duration_ms"]) for r in rows] == [
        (0, "current_time", False, 12.5),
        (1, "lookup", True, 12.5),
    ]
    [execution] = await fetch(db_url, "SELECT output, output_truncated FROM executions")
    assert execution["output"] == "é" * 511 and execution["output_truncated"]
    # `tally jobs show`: the tool calls in order after the call that asked for them, and the
    # answer; as a table and as JSON.
    show = [sys.executable, "-m", "orchestrator", "jobs", "show", job_id, "--database-url", db_url]
    document = json.loads(
        subprocess.run(
            [*show, "--format", "json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert [t["name"] for t in document["toolCalls"]] == ["current_time", "lookup"]
    assert document["output"]["value"] == "é" * 511 and document["output"]["truncated"]
    table = subprocess.run(show, capture_output=True, text=True, check=True).stdout
    lines = [line for line in table.splitlines() if "│ call " in line or "│ tool " in line]
    assert "call 0" in lines[0] and "current_time" in lines[1] and "lookup" in lines[2], table
    assert "output" in table and "cut to" in table


async def test_structured_output_is_stored_as_json_and_deep_output_refused(db_url: str) -> None:
    """An object answer is stored as JSON and relayed as the object; one nested past the
    limit is refused at $.payload.output (which still ends that attempt: failed,
    invalid_result, issue 25), and the link goes on."""
    async with running_service(db_url) as service:
        worker = RawDaemon(ws_url(service), "w1")
        await worker.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            [job_id] = await client.submit([p.JobSpec(executor="simulated")])
            offer = await worker.next_of(p.JobOffer, timeout=scaled(10))
            await worker.accept(offer)
            deep: dict[str, Any] = {}
            node = deep
            for _ in range(60):
                node["a"] = {}
                node = node["a"]
            assert worker.ws is not None
            bad = p.make(p.JobResult, p.ResultPayload(success=True, output=deep), offer.id)
            await worker.ws.send(p.encode(bad).decode())
            error, ended = await acks(worker, 2)
            assert isinstance(error, p.Error) and error.payload.code == "invalid_frame"
            assert error.payload.path == "$.payload.output"
            assert isinstance(ended, p.JobAck) and ended.id == offer.id
            refused = (await client.wait([job_id], timeout=scaled(10)))[job_id]
            assert refused.status == "failed"
            [job_id] = await client.submit([p.JobSpec(executor="simulated")])
            offer = await worker.next_of(p.JobOffer, timeout=scaled(10))
            await worker.accept(offer)
            good = {"verdict": "ok", "score": 3, "nested": {"list": [1, 2]}}
            await worker.send(
                p.make(p.JobResult, p.ResultPayload(success=True, output=good), offer.id)
            )
            await acks(worker, 1)
            final = (await client.wait([job_id], timeout=scaled(10)))[job_id]
        await worker.close()
    assert final.output == good and final.output_truncated is p.UNSET
    rows = await fetch(
        db_url, "SELECT output, output_format, error_class FROM executions ORDER BY offered_at"
    )
    assert [r["error_class"] for r in rows] == ["invalid_result", None]
    assert rows[1]["output_format"] == "json" and json.loads(rows[1]["output"]) == good


async def test_submit_refuses_bad_specs_and_unknown_executors(db_url: str) -> None:
    """A bad spec is refused with the path of its field, an executor no registered daemon
    offers is refused naming those that exist (unless allowed); nothing is written."""
    async with running_service(db_url) as service:
        worker = RawDaemon(ws_url(service), "w1", executors=["simulated", "openai"])
        await worker.connect()
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            good = p.JobSpec(executor="simulated")
            cases = [
                (
                    p.JobSpec(executor="openai", spec={"prompt": "x", "maxTokens": 0}),
                    "$.payload.jobs[1].spec.maxTokens",
                ),
                (p.JobSpec(executor="openai", spec={"promt": "x"}), "$.payload.jobs[1].spec.promt"),
                (
                    p.JobSpec(executor="anthropic", spec={"system": "no prompt"}),
                    "$.payload.jobs[1].spec",
                ),
                (
                    p.JobSpec(executor="simulated", spec={"tools": "current_time"}),
                    "$.payload.jobs[1].spec.tools",
                ),
            ]
            for bad, path in cases:
                with pytest.raises(RefusedError) as refused:
                    await client.submit([good, bad])
                assert "invalid_spec" in str(refused.value) and f"(at {path})" in str(
                    refused.value
                ), str(refused.value)
            with pytest.raises(RefusedError) as unknown:
                await client.submit([good, p.JobSpec(executor="gemini", spec={"prompt": "x"})])
            message = str(unknown.value)
            assert "unknown_executor" in message and "offered: openai, simulated" in message
            assert "$.payload.jobs[1].executor" in message
            assert not await fetch(db_url, "SELECT id FROM jobs")
            ids = await client.submit(
                [p.JobSpec(executor="gemini", spec={"prompt": "x"})], allow_unknown_executor=True
            )
            assert len(ids) == 1
        await worker.close()


def test_cli_refuses_a_bad_spec_before_connecting(tmp_path: Any) -> None:
    """`tally submit` checks the spec itself: exit 2 naming the field, nothing sent (the
    orchestrator address is unreachable, and never tried)."""
    bad = tmp_path / "jobs.jsonl"
    bad.write_text(
        json.dumps({"executor": "simulated"})
        + "\n"
        + json.dumps({"executor": "ollama", "spec": {"prompt": "x", "stream": "yes"}})
        + "\n"
    )
    for args in (
        ("--executor", "openai", "--spec", '{"prompt": "x", "api": "assistants"}'),
        ("--file", str(bad)),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "submit",
                "--orchestrator",
                "ws://127.0.0.1:1/ws",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "$.spec." in done.stderr and "cannot connect" not in done.stderr
    assert "line 2 (ollama)" in done.stderr and "$.spec.stream" in done.stderr


def test_output_is_cut_by_its_size_as_json() -> None:
    """Control characters take six bytes each in JSON: the cut counts what travels."""
    for text in ("\x01" * 5000, "é" * 5000, "a" * 5000, "\U0001f600" * 5000):
        cut, flagged = cut_text(text, 4096)
        assert flagged and len(msgspec.json.encode(cut)) <= 4096
        assert text.startswith(cut) and len(msgspec.json.encode(cut)) > 4096 - 16
    assert cut_text("short", 4096) == ("short", False)
    value, flagged = fit({"k": "v" * 100}, 50)
    assert flagged and isinstance(value, str) and value.startswith('{"k":"vvv')
    assert fit({"k": "v"}, 50) == ({"k": "v"}, False)


def test_every_built_in_executor_has_a_spec_the_daemon_decodes() -> None:
    """One struct per built-in executor, and each refuses an unknown field by name."""
    from daemon.executors import BUILTIN

    assert set(specs.SPECS) == set(BUILTIN)
    for name, kind in specs.SPECS.items():
        with pytest.raises(specs.SpecError) as refused:
            specs.decode(kind, {"prompt": "x", "bogus": 1})
        assert refused.value.path == "$.spec.bogus", name

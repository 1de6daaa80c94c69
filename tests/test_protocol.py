"""The tally/1 wire protocol: accepted and rejected frames, paths of faults, round trips."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import protocol as p

EID = "0d5e6f4b-7a1c-4d2e-9f3a-1b2c3d4e5f60"
JID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
ENTRY = {
    "model": "claude-sonnet-4-5",
    "inputTokens": 10,
    "outputTokens": 20,
    "cacheReadInputTokens": 30,
    "cacheCreationInputTokens": 40,
    "costUsd": 0.5,
}


def frame(ftype: str, payload: Any = None, **envelope: Any) -> str:
    """A frame as text, with a valid envelope unless overridden."""
    body: dict[str, Any] = {"type": ftype, "id": EID, "timestamp": 1732380000000}
    if payload is not None:
        body["payload"] = payload
    body.update(envelope)
    return json.dumps(body)


def result(**payload: Any) -> str:
    """A job:result frame with the given payload fields (success defaults to true)."""
    payload.setdefault("success", True)
    return frame("job:result", payload)


REGISTER = {
    "daemonId": "d1",
    "hostname": "h",
    "version": "0.1.0",
    "protocolVersion": "1.0",
    "executors": [{"name": "simulated", "models": ["sim-small"]}],
    "maxConcurrentJobs": 4,
}

ACCEPTED_DAEMON = [
    frame("daemon:register", REGISTER),
    frame(
        "daemon:register",
        {**REGISTER, "inflight": [{"executionId": EID, "jobId": JID}], "labels": {"z": "a"}},
    ),
    frame("heartbeat:pong", {"activeJobs": 0}),
    frame("heartbeat:pong", {"activeJobs": 3, "resources": {"cpu": 0.5}}),
    frame("job:accept", {}),
    frame("job:reject", {"reason": "busy"}),
    frame("job:reject", {"reason": "unsupported", "message": "no such model"}),
    frame("job:status", {"status": "running", "message": "warming up"}),
    frame("job:generation", {"seq": 0, "provider": "anthropic"}),
    frame(
        "job:generation",
        {
            "seq": 7,
            "provider": "openai",
            "requestModel": "gpt-4.1",
            "responseModel": "gpt-4.1-2025-04-14",
            "finishReason": "stop",
            "inputTokens": 1,
            "outputTokens": 2,
            "cacheReadInputTokens": 3,
            "cacheCreationInputTokens": 0,
            "reasoningTokens": 1,
            "costUsd": 0.01,
            "costSource": "price_table",
            "durationMs": 12.5,
            "requestId": "req_1",
        },
    ),
    frame("job:generation", {"seq": 1, "provider": "ollama", "tokensUnavailable": True}),
    frame("daemon:draining", {"activeJobs": 2, "reason": "SIGTERM"}),
    result(),
    result(success=False, errorMessage="boom"),
    result(inputTokens=3_000_000_000, outputTokens=10**15),
    result(inputTokens=2**53 - 1),
    result(modelUsage=[ENTRY]),
    result(modelUsage=[{**ENTRY, "provider": "anthropic", "reasoningTokens": 5}]),
    *[
        result(modelUsage=[{**ENTRY, "model": m} for m in models])
        for models in ("ab", "abc", "abcd")
    ],
    result(costUsd=0, durationMs=0.25, numTurns=0, costSource="unpriced", stopReason="budget"),
    result(deliveryId="abc", tokensUnavailable=True, reasoningTokens=0),
    result(unknownFutureField={"nested": [1, 2]}),
    frame("job:result", {"success": True}, timestamp=1732380000000.75),
    frame("job:result", {"success": True}, id=EID.upper()),
    frame("job:result", {"success": True}, id="00000000-0000-0000-0000-000000000000"),
    frame("job:result", {"success": True}, id="ffffffff-ffff-ffff-ffff-ffffffffffff"),
    frame("job:result", {"success": True}, id="0d5e6f4b-7a1c-1d2e-8f3a-1b2c3d4e5f60"),
    frame("job:result", {"success": True}, id="0d5e6f4b-7a1c-8d2e-bf3a-1b2c3d4e5f60"),
    frame("job:result", {"success": True}, extra="ignored"),
]


@pytest.mark.parametrize("raw", ACCEPTED_DAEMON)
def test_daemon_frames_accepted(raw: str) -> None:
    """Valid daemon frames decode, and as bytes too."""
    decoded = p.decode_daemon_frame(raw)
    assert p.frame_type(decoded) == json.loads(raw)["type"]
    assert p.decode_daemon_frame(raw.encode()) == decoded


def test_big_counters_keep_their_value() -> None:
    """Counters past 2^31 up to 2^53 - 1 (what a float64 counter holds exactly) decode as
    exact ints."""
    decoded = p.decode_daemon_frame(result(inputTokens=2**53 - 1, outputTokens=10**15))
    assert isinstance(decoded, p.JobResult)
    assert decoded.payload.input_tokens == 2**53 - 1
    assert decoded.payload.output_tokens == 10**15


def test_unknown_keys_are_ignored_and_not_reencoded() -> None:
    """An unknown key is ignored on decode and absent on encode."""
    decoded = p.decode_daemon_frame(result(futureField=1))
    assert b"futureField" not in p.encode(decoded)


def test_optional_fields_are_omitted_on_encode() -> None:
    """An optional field never appears as null on the wire."""
    encoded = json.loads(p.encode(p.decode_daemon_frame(result())))
    assert encoded["payload"] == {"success": True}


REJECTED_DAEMON: list[tuple[str, str, str]] = [
    ("{", "invalid_json", "$"),
    ("", "invalid_json", "$"),
    ("[1,2]", "invalid_frame", "$"),
    ('"job:result"', "invalid_frame", "$"),
    (json.dumps({"id": EID, "timestamp": 1, "payload": {}}), "invalid_frame", "$.type"),
    (frame("job:unknown", {}), "unknown_type", "$.type"),
    (
        frame("job:offer", {"jobId": JID, "attempt": 1, "executor": "x"}),
        "wrong_direction",
        "$.type",
    ),
    (frame("job:ack", {"of": "job:result"}), "wrong_direction", "$.type"),
    (frame("job:submit", {"jobs": [{"executor": "x"}]}), "wrong_direction", "$.type"),
    (frame("error", {"code": "x", "message": "y"}), "wrong_direction", "$.type"),
    (frame("job:result"), "invalid_frame", "$.payload"),
    (
        json.dumps({"type": "job:result", "id": EID, "timestamp": 1, "payload": None}),
        "invalid_frame",
        "$.payload",
    ),
    (frame("job:result", [1]), "invalid_frame", "$.payload"),
    (
        json.dumps({"type": "job:result", "timestamp": 1, "payload": {"success": True}}),
        "invalid_frame",
        "$.id",
    ),
    (
        json.dumps({"type": "job:result", "id": EID, "payload": {"success": True}}),
        "invalid_frame",
        "$.timestamp",
    ),
    (
        frame("job:result", {"success": True}, timestamp="1732380000000"),
        "invalid_frame",
        "$.timestamp",
    ),
    (frame("job:result", {"success": True}, timestamp=-1), "invalid_frame", "$.timestamp"),
    (frame("job:result", {"success": True}, timestamp=None), "invalid_frame", "$.timestamp"),
    (frame("job:result", {"success": True}, id="not-a-uuid"), "invalid_frame", "$.id"),
    (
        frame("job:result", {"success": True}, id="0d5e6f4b-7a1c-0d2e-9f3a-1b2c3d4e5f60"),
        "invalid_frame",
        "$.id",
    ),
    (
        frame("job:result", {"success": True}, id="0d5e6f4b-7a1c-9d2e-9f3a-1b2c3d4e5f60"),
        "invalid_frame",
        "$.id",
    ),
    (
        frame("job:result", {"success": True}, id="0d5e6f4b-7a1c-4d2e-cf3a-1b2c3d4e5f60"),
        "invalid_frame",
        "$.id",
    ),
    (
        frame("job:result", {"success": True}, id="0d5e6f4b7a1c4d2e9f3a1b2c3d4e5f60"),
        "invalid_frame",
        "$.id",
    ),
    (frame("job:result", {"success": True}, id=None), "invalid_frame", "$.id"),
    (frame("job:result", {"success": True}, id=7), "invalid_frame", "$.id"),
    (frame("job:result", {}), "invalid_frame", "$.payload.success"),
    (result(success="true"), "invalid_frame", "$.payload.success"),
    (result(success=1), "invalid_frame", "$.payload.success"),
    (result(inputTokens=-1), "invalid_frame", "$.payload.inputTokens"),
    (result(inputTokens=1.5), "invalid_frame", "$.payload.inputTokens"),
    (result(inputTokens=1.0), "invalid_frame", "$.payload.inputTokens"),
    (result(inputTokens="12"), "invalid_frame", "$.payload.inputTokens"),
    (result(inputTokens=None), "invalid_frame", "$.payload.inputTokens"),
    (result(inputTokens=2**63), "invalid_frame", "$.payload.inputTokens"),
    (result(inputTokens=2**53), "invalid_frame", "$.payload.inputTokens"),
    (result(costUsd=1e308), "invalid_frame", "$.payload.costUsd"),
    (result(costUsd=1.0e10), "invalid_frame", "$.payload.costUsd"),
    (result(durationMs=1e300), "invalid_frame", "$.payload.durationMs"),
    (result(numTurns=2**31), "invalid_frame", "$.payload.numTurns"),
    (result(outputTokens=-5), "invalid_frame", "$.payload.outputTokens"),
    (result(cacheReadInputTokens="0"), "invalid_frame", "$.payload.cacheReadInputTokens"),
    (result(cacheCreationInputTokens=None), "invalid_frame", "$.payload.cacheCreationInputTokens"),
    (result(reasoningTokens=-1), "invalid_frame", "$.payload.reasoningTokens"),
    (result(costUsd=-0.01), "invalid_frame", "$.payload.costUsd"),
    (result(costUsd="0.1"), "invalid_frame", "$.payload.costUsd"),
    (result(costUsd=None), "invalid_frame", "$.payload.costUsd"),
    (result(durationMs="5"), "invalid_frame", "$.payload.durationMs"),
    (result(numTurns=1.5), "invalid_frame", "$.payload.numTurns"),
    (result(errorMessage=None), "invalid_frame", "$.payload.errorMessage"),
    (result(costSource="guess"), "invalid_frame", "$.payload.costSource"),
    (result(stopReason="whatever"), "invalid_frame", "$.payload.stopReason"),
    (result(tokensUnavailable="yes"), "invalid_frame", "$.payload.tokensUnavailable"),
    (result(modelUsage=None), "invalid_frame", "$.payload.modelUsage"),
    (result(modelUsage={}), "invalid_frame", "$.payload.modelUsage"),
    (result(modelUsage=[{**ENTRY, "model": ""}]), "invalid_frame", "$.payload.modelUsage[0].model"),
    (
        result(modelUsage=[ENTRY, {**ENTRY, "inputTokens": -1}]),
        "invalid_frame",
        "$.payload.modelUsage[1].inputTokens",
    ),
    (
        result(modelUsage=[{**ENTRY, "costUsd": "1"}]),
        "invalid_frame",
        "$.payload.modelUsage[0].costUsd",
    ),
    (
        result(modelUsage=[{**ENTRY, "provider": None}]),
        "invalid_frame",
        "$.payload.modelUsage[0].provider",
    ),
    (
        result(modelUsage=[ENTRY, {**ENTRY, "model": "other"}, ENTRY]),
        "invalid_frame",
        "$.payload.modelUsage[2].model",
    ),
    *[
        (
            result(modelUsage=[{**ENTRY, "model": m} for m in models]),
            "invalid_frame",
            f"$.payload.modelUsage[{at}].model",
        )
        for models, at in [
            (["a", "a"], 1),
            (["a", "b", "b"], 2),
            (["b", "a", "b"], 2),
            (["a", "a", "b"], 1),
            (["a", "b", "c", "d", "c"], 4),
        ]
    ],
    *[
        (
            result(modelUsage=[{k: v for k, v in ENTRY.items() if k != missing}]),
            "invalid_frame",
            f"$.payload.modelUsage[0].{missing}",
        )
        for missing in ENTRY
    ],
    (frame("job:generation", {"provider": "x"}), "invalid_frame", "$.payload.seq"),
    (frame("job:generation", {"seq": -1, "provider": "x"}), "invalid_frame", "$.payload.seq"),
    (frame("job:generation", {"seq": 0, "provider": ""}), "invalid_frame", "$.payload.provider"),
    (
        frame("job:generation", {"seq": 0, "provider": "x", "responseModel": None}),
        "invalid_frame",
        "$.payload.responseModel",
    ),
    (
        frame("job:generation", {"seq": 0, "provider": "x", "outputTokens": "3"}),
        "invalid_frame",
        "$.payload.outputTokens",
    ),
    (
        frame("daemon:register", {**REGISTER, "maxConcurrentJobs": -1}),
        "invalid_frame",
        "$.payload.maxConcurrentJobs",
    ),
    (
        frame("daemon:register", {**REGISTER, "executors": [{"name": ""}]}),
        "invalid_frame",
        "$.payload.executors[0].name",
    ),
    (
        frame("daemon:register", {k: v for k, v in REGISTER.items() if k != "daemonId"}),
        "invalid_frame",
        "$.payload.daemonId",
    ),
    (
        frame("daemon:register", {**REGISTER, "inflight": [{"executionId": "x", "jobId": JID}]}),
        "invalid_frame",
        "$.payload.inflight[0].executionId",
    ),
    (frame("heartbeat:pong", {"activeJobs": -2}), "invalid_frame", "$.payload.activeJobs"),
    (frame("job:reject", {"reason": ""}), "invalid_frame", "$.payload.reason"),
    (frame("job:status", {"status": "done"}), "invalid_frame", "$.payload.status"),
]


@pytest.mark.parametrize(("raw", "code", "path"), REJECTED_DAEMON)
def test_daemon_frames_rejected_with_path(raw: str, code: str, path: str) -> None:
    """Invalid daemon frames raise ProtocolError with a stable code and the JSON path."""
    with pytest.raises(p.ProtocolError) as info:
        p.decode_daemon_frame(raw)
    assert info.value.code == code
    assert info.value.path == path


def test_rejection_reports_frame_type_and_id() -> None:
    """A rejected frame's type and id are reported so an error frame can reuse the id."""
    with pytest.raises(p.ProtocolError) as info:
        p.decode_daemon_frame(result(inputTokens=-1))
    assert info.value.frame_type == "job:result"
    assert info.value.frame_id == EID


def test_uuid_message_is_readable() -> None:
    """A bad id names the RFC rather than dumping the regex."""
    with pytest.raises(p.ProtocolError) as info:
        p.decode_daemon_frame(frame("job:accept", {}, id="nope"))
    assert "RFC 9562" in info.value.message


def test_bad_id_is_not_echoed() -> None:
    """A frame whose id is not a UUID is reported without that id (an error frame reusing it
    would itself be invalid), in every direction."""
    bad = "6f1c2b9e-8d4a-0c3b-a2e1-0f9d8c7b6a51"
    cases = [
        (p.decode_daemon_frame, frame("job:result", {"success": True}, id=bad)),
        (p.decode_server_frame, frame("job:ack", {"of": "job:result"}, id=bad)),
        (p.decode_client_frame, frame("job:watch", {"jobIds": [JID]}, id=bad)),
    ]
    for decode, raw in cases:
        with pytest.raises(p.ProtocolError) as info:
            decode(raw)
        error = info.value
        assert (error.code, error.path, error.frame_id) == ("invalid_frame", "$.id", None)
        assert info.value.frame_type == json.loads(raw)["type"]
    with pytest.raises(p.ProtocolError) as info:
        p.decode_daemon_frame(frame("job:result", {"success": 1}, id=bad))
    assert info.value.path == "$.payload.success" and info.value.frame_id is None


ACCEPTED_SERVER = [
    frame(
        "daemon:registered",
        {"heartbeatIntervalMs": 5000, "offerTimeoutMs": 10000, "leaseTimeoutMs": 30000},
    ),
    frame("heartbeat:ping", {}),
    frame(
        "job:offer",
        {
            "jobId": JID,
            "attempt": 1,
            "executor": "simulated",
            "limits": {"maxTotalTokens": 10, "budgetUsd": 0.5},
        },
    ),
    frame("job:ack", {"of": "job:result"}),
    frame("job:ack", {"of": "job:generation", "seq": 3}),
    frame("job:cancel", {"reason": "client asked"}),
    frame("job:submitted", {"jobIds": [JID]}),
    frame(
        "job:update",
        {"jobId": JID, "status": "succeeded", "totals": {"inputTokens": 5, "costUsd": 0.1}},
    ),
    frame("error", {"code": "invalid_frame", "message": "bad", "path": "$.payload"}),
]


@pytest.mark.parametrize("raw", ACCEPTED_SERVER)
def test_server_frames_accepted(raw: str) -> None:
    """Valid orchestrator frames decode with the server decoder."""
    assert p.frame_type(p.decode_server_frame(raw)) == json.loads(raw)["type"]


REJECTED_SERVER = [
    (result(), "wrong_direction", "$.type"),
    (frame("daemon:register", REGISTER), "wrong_direction", "$.type"),
    (
        frame("job:offer", {"jobId": JID, "attempt": 0, "executor": "x"}),
        "invalid_frame",
        "$.payload.attempt",
    ),
    (
        frame(
            "job:offer", {"jobId": JID, "attempt": 1, "executor": "x", "limits": {"maxTurns": 0}}
        ),
        "invalid_frame",
        "$.payload.limits.maxTurns",
    ),
    (frame("job:ack", {"of": "job:accept"}), "invalid_frame", "$.payload.of"),
    (frame("job:update", {"jobId": JID, "status": "lost"}), "invalid_frame", "$.payload.status"),
]


@pytest.mark.parametrize(("raw", "code", "path"), REJECTED_SERVER)
def test_server_frames_rejected(raw: str, code: str, path: str) -> None:
    """The server decoder refuses daemon frames and invalid server frames."""
    with pytest.raises(p.ProtocolError) as info:
        p.decode_server_frame(raw)
    assert (info.value.code, info.value.path) == (code, path)


ACCEPTED_CLIENT = [
    frame("job:submit", {"jobs": [{"executor": "simulated"}]}),
    frame(
        "job:submit",
        {
            "jobs": [
                {
                    "executor": "simulated",
                    "model": "sim-small",
                    "spec": {"prompt": "hi"},
                    "labels": {"tenant": "a"},
                    "idempotencyKey": "k1",
                    "maxAttempts": 2,
                    "priority": 5,
                }
            ]
        },
    ),
    frame("job:watch", {"jobIds": [JID]}),
    frame("job:cancel", {"jobId": JID}),
]


@pytest.mark.parametrize("raw", ACCEPTED_CLIENT)
def test_client_frames_accepted(raw: str) -> None:
    """Valid client frames decode with the client decoder."""
    assert p.frame_type(p.decode_client_frame(raw)) == json.loads(raw)["type"]


REJECTED_CLIENT = [
    (frame("job:submit", {"jobs": []}), "invalid_frame", "$.payload.jobs"),
    (
        frame("job:submit", {"jobs": [{"executor": ""}]}),
        "invalid_frame",
        "$.payload.jobs[0].executor",
    ),
    (
        frame("job:submit", {"jobs": [{"executor": "x", "maxAttempts": 0}]}),
        "invalid_frame",
        "$.payload.jobs[0].maxAttempts",
    ),
    (
        frame("job:submit", {"jobs": [{"executor": "x", "labels": {"a": 1}}]}),
        "invalid_frame",
        "$.payload.jobs[0].labels[...]",
    ),
    (frame("job:watch", {"jobIds": ["x"]}), "invalid_frame", "$.payload.jobIds[0]"),
    (result(), "wrong_direction", "$.type"),
    (frame("heartbeat:pong", {"activeJobs": 0}), "wrong_direction", "$.type"),
]


@pytest.mark.parametrize(("raw", "code", "path"), REJECTED_CLIENT)
def test_client_frames_rejected(raw: str, code: str, path: str) -> None:
    """The client decoder refuses daemon frames and invalid submissions."""
    with pytest.raises(p.ProtocolError) as info:
        p.decode_client_frame(raw)
    assert (info.value.code, info.value.path) == (code, path)


def test_reference_result_decodes_unchanged() -> None:
    """A job:result exactly as the reference orchestrator's daemons send it decodes here."""
    reference = {
        "type": "job:result",
        "id": "3b241101-e2bb-4255-8caf-4136c566a962",
        "timestamp": 1732380000123,
        "payload": {
            "success": True,
            "deliveryId": "del_01",
            "costUsd": 0.0123,
            "durationMs": 4200,
            "numTurns": 4,
            "inputTokens": 12,
            "outputTokens": 345,
            "cacheReadInputTokens": 20000,
            "cacheCreationInputTokens": 1500,
            "modelUsage": [ENTRY],
        },
    }
    decoded = p.decode_daemon_frame(json.dumps(reference))
    assert json.loads(p.encode(decoded)) == reference


# --- hypothesis round trips ------------------------------------------------------------------

uuids = st.one_of(st.uuids(version=4), st.uuids(version=1)).map(str)
counts = st.integers(min_value=0, max_value=p.MAX_COUNTER)
money = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
names = st.text(min_size=1, max_size=20)
maybe = lambda s: st.one_of(st.just(msgspec.UNSET), s)  # noqa: E731

limits = st.builds(
    p.Limits,
    max_turns=maybe(st.integers(1, 1000)),
    max_output_tokens=maybe(counts),
    max_total_tokens=maybe(counts),
    budget_usd=maybe(money),
    timeout_ms=maybe(st.integers(1, 10**9)),
)
model_usage = st.builds(
    p.ModelUsage,
    model=names,
    input_tokens=counts,
    output_tokens=counts,
    cache_read_input_tokens=counts,
    cache_creation_input_tokens=counts,
    cost_usd=money,
    provider=maybe(names),
    reasoning_tokens=maybe(counts),
)
PAYLOADS: dict[type, Any] = {
    p.DaemonRegister: st.builds(
        p.RegisterPayload,
        daemon_id=st.text(min_size=1, max_size=50),
        hostname=st.text(max_size=50),
        version=st.text(max_size=50),
        protocol_version=names,
        executors=st.lists(st.builds(p.ExecutorInfo, name=names, models=st.lists(names))),
        max_concurrent_jobs=st.integers(0, 1000),
        labels=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=20)),
        inflight=st.lists(st.builds(p.InflightExecution, execution_id=uuids, job_id=uuids)),
    ),
    p.DaemonRegistered: st.builds(
        p.RegisteredPayload,
        heartbeat_interval_ms=st.integers(1, 10**6),
        offer_timeout_ms=st.integers(1, 10**6),
        lease_timeout_ms=st.integers(1, 10**6),
        resumed=st.lists(uuids),
    ),
    p.HeartbeatPing: st.just(p.EmptyPayload()),
    p.HeartbeatPong: st.builds(p.PongPayload, active_jobs=counts),
    p.JobOffer: st.builds(
        p.OfferPayload,
        job_id=uuids,
        attempt=st.integers(1, 100),
        executor=names,
        model=maybe(names),
        spec=st.dictionaries(st.text(), st.integers() | st.text()),
        limits=limits,
    ),
    p.JobAccept: st.just(p.EmptyPayload()),
    p.JobReject: st.builds(p.RejectPayload, reason=names, message=maybe(st.text())),
    p.JobStatus: st.builds(p.StatusPayload, status=st.just("running"), message=maybe(st.text())),
    p.JobGeneration: st.builds(
        p.GenerationPayload,
        seq=st.integers(0, 2**31 - 1),
        provider=names,
        response_model=maybe(names),
        input_tokens=maybe(counts),
        output_tokens=maybe(counts),
        cache_read_input_tokens=maybe(counts),
        cache_creation_input_tokens=maybe(counts),
        reasoning_tokens=maybe(counts),
        tokens_unavailable=maybe(st.booleans()),
        cost_usd=maybe(money),
        cost_source=maybe(st.sampled_from(["provider", "price_table", "local"])),
        duration_ms=maybe(money),
    ),
    p.JobResult: st.builds(
        p.ResultPayload,
        success=st.booleans(),
        cost_usd=maybe(money),
        num_turns=maybe(st.integers(0, p.MAX_TURNS)),
        input_tokens=maybe(counts),
        output_tokens=maybe(counts),
        cache_read_input_tokens=maybe(counts),
        cache_creation_input_tokens=maybe(counts),
        model_usage=maybe(st.lists(model_usage, max_size=4, unique_by=lambda e: e.model)),
        error_message=maybe(st.text()),
        stop_reason=maybe(st.sampled_from(["end_turn", "budget", "max_total_tokens"])),
        output=maybe(
            st.one_of(
                st.text(),
                st.dictionaries(st.text(max_size=10), st.one_of(st.text(), st.integers(-9, 9))),
            )
        ),
        output_truncated=maybe(st.booleans()),
    ),
    p.JobTool: st.builds(
        p.ToolPayload,
        seq=st.integers(0, 2**31 - 1),
        name=names,
        started_at=st.floats(min_value=0, max_value=1e13, allow_nan=False),
        duration_ms=money,
        after_call=maybe(st.integers(0, 2**31 - 1)),
        arguments_bytes=counts,
        result_bytes=counts,
        error=st.booleans(),
    ),
    p.JobAck: st.builds(
        p.AckPayload,
        of=st.sampled_from(["job:generation", "job:tool"]),
        seq=maybe(counts.map(lambda n: n % 2**31)),
    ),
    p.JobCancel: st.builds(p.CancelPayload, reason=st.text()),
    p.DaemonDraining: st.builds(p.DrainingPayload, active_jobs=counts, reason=st.text(max_size=50)),
    p.JobSubmit: st.builds(
        p.SubmitPayload,
        jobs=st.lists(
            st.builds(
                p.JobSpec,
                executor=names,
                model=maybe(names),
                limits=limits,
                labels=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=20)),
                idempotency_key=maybe(st.text(min_size=1, max_size=50)),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    p.JobSubmitted: st.builds(p.SubmittedPayload, job_ids=st.lists(uuids)),
    p.JobWatch: st.builds(p.WatchPayload, job_ids=st.lists(uuids, min_size=1, max_size=5)),
    p.ClientCancel: st.builds(p.ClientCancelPayload, job_id=uuids, reason=st.text(max_size=50)),
    p.JobUpdate: st.builds(
        p.UpdatePayload,
        job_id=uuids,
        status=st.sampled_from(["queued", "running", "succeeded", "failed", "cancelled"]),
        attempts=counts,
        totals=maybe(st.builds(p.JobTotals, input_tokens=maybe(counts), cost_usd=maybe(money))),
    ),
    p.Error: st.builds(p.ErrorPayload, code=names, message=st.text(), path=maybe(st.text())),
}

DECODERS = {
    **{t: p.decode_daemon_frame for t in p.DaemonFrame.__args__},  # type: ignore[attr-defined]
    **{t: p.decode_server_frame for t in p.ServerFrame.__args__},  # type: ignore[attr-defined]
    **{t: p.decode_client_frame for t in p.ClientFrame.__args__},  # type: ignore[attr-defined]
}


def test_every_message_type_has_a_round_trip_strategy() -> None:
    """No frame type is left out of the round-trip property."""
    assert set(PAYLOADS) == set(DECODERS)


@pytest.mark.parametrize("cls", list(PAYLOADS), ids=lambda c: c.__struct_config__.tag)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    """encode then decode gives back the same frame, for every message type."""
    payload = data.draw(PAYLOADS[cls])
    timestamp = data.draw(st.floats(min_value=0, max_value=1e13, allow_nan=False))
    original = cls(id=data.draw(uuids), timestamp=timestamp, payload=payload)
    assert DECODERS[cls](p.encode(original)) == original

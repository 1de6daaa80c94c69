"""Retries: a failed attempt is classified by the daemon; a retryable one re-queues its job
with a backoff (honouring the provider's retry-after) while attempts remain, a permanent one
fails it at once. Through the real Anthropic SDK against a local server in its wire format,
a real `tally serve` and `tallyd`, and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.failures import classify
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
from tests.test_executor_anthropic import message, usage

anthropic = pytest.importorskip("anthropic")

OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
UNAUTHORIZED = {
    "type": "error",
    "error": {"type": "authentication_error", "message": "invalid x-api-key"},
}


async def _one_job(db_url: str, provider: FakeProvider, tmp_path: Path) -> tuple[Any, list[Any]]:
    """Run one anthropic job (3 attempts allowed, the SDK's own retries off)."""
    with serving(provider) as url:
        async with running_service(db_url) as service:
            config = json.dumps({"base_url": url, "api_key": "test", "max_retries": 0})
            daemon = start_daemon(
                ws_url(service), tmp_path / "d", "--executor", f"anthropic={config}"
            )
            try:
                async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                    [job_id] = await submit_early(
                        client,
                        [
                            p.JobSpec(
                                executor="anthropic",
                                model="claude-sonnet-4-6",
                                spec={"prompt": "hi"},
                                max_attempts=3,
                            )
                        ],
                    )
                    final = (await client.wait([job_id], timeout=scaled(60)))[job_id]
            finally:
                await stop_daemon_async(daemon)
    executions = await fetch(
        db_url,
        "SELECT attempt, status, error_class, offered_at, finished_at, input_tokens"
        " FROM executions WHERE job_id = $1 ORDER BY attempt",
        job_id,
    )
    return final, list(executions)


async def test_overloaded_twice_then_success_on_attempt_three(db_url: str, tmp_path: Path) -> None:
    """529 overloaded (retry-after 1 s), 529, then an answer: the job succeeds on attempt 3;
    the first retry waited at least the second the provider asked for; every attempt is in
    the ledger with its class."""
    provider = FakeProvider(
        [
            Scripted(status=529, body=OVERLOADED, headers={"retry-after": "1"}),
            Scripted(status=529, body=OVERLOADED),
            Scripted(body=message("end_turn", usage(12, 5))),
        ]
    )
    final, executions = await _one_job(db_url, provider, tmp_path)
    assert final.status == "succeeded" and final.attempts == 3
    assert [(e["attempt"], e["status"], e["error_class"]) for e in executions] == [
        (1, "failed", "retryable"),
        (2, "failed", "retryable"),
        (3, "succeeded", None),
    ]
    waited = (executions[1]["offered_at"] - executions[0]["finished_at"]).total_seconds()
    assert waited >= 0.95, waited
    assert isinstance(final.totals, p.JobTotals) and final.totals.input_tokens == 12
    job = (await fetch(db_url, "SELECT attempts, status, finished_at FROM jobs"))[0]
    assert (job["attempts"], job["status"]) == (3, "succeeded") and job["finished_at"]


async def test_unauthorized_fails_at_once(db_url: str, tmp_path: Path) -> None:
    """401 is permanent: the job fails on attempt 1 although 3 were allowed."""
    provider = FakeProvider([Scripted(status=401, body=UNAUTHORIZED)] * 3)
    final, executions = await _one_job(db_url, provider, tmp_path)
    assert final.status == "failed" and final.attempts == 1
    assert [(e["status"], e["error_class"]) for e in executions] == [("failed", "permanent")]
    assert len(provider.requests) == 1


def test_classification_of_sdk_and_network_errors() -> None:
    """Status codes, the SDKs' connection and timeout classes, retry-after in seconds or as
    an HTTP date; anything else is permanent."""
    request = httpx.Request("POST", "http://x/v1/messages")

    def status_error(code: int, headers: dict[str, str] | None = None) -> Exception:
        response = httpx.Response(code, headers=headers or {}, request=request)
        return anthropic.APIStatusError("boom", response=response, body=None)

    assert classify(status_error(529, {"retry-after": "2"})) == ("retryable", 2000.0)
    assert classify(status_error(429, {"retry-after-ms": "150"})) == ("retryable", 150.0)
    assert classify(status_error(503)) == ("retryable", None)
    assert classify(status_error(401)) == ("permanent", None)
    assert classify(status_error(400)) == ("permanent", None)
    assert classify(anthropic.APIConnectionError(request=request))[0] == "retryable"
    assert classify(anthropic.APITimeoutError(request=request))[0] == "retryable"
    assert classify(ConnectionResetError()) == ("retryable", None)
    assert classify(ValueError("bad spec")) == ("permanent", None)
    dated = classify(status_error(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    assert dated == ("retryable", None)  # in the past: no wait asked

"""A job frame never exceeds the orchestrator's frame limit (review of issue 25, finding 3).

The orchestrator advertises its ``--max-frame-bytes`` in ``daemon:registered``; the daemon
fits every result under it when it sends it and when it resends it from its outbox, so a
large answer cannot close the link (1009) after every reconnect and wedge the daemon. And
``tally serve`` refuses a limit below the floor every frame fits under.

Through a real ``tally serve`` (in this process) and a real ``tallyd`` running the real openai
SDK against tests/fakeprovider.py; the resend through a scripted orchestrator on a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from orchestrator.client import TallyClient
from orchestrator.config import ServeSettings
from shared import protocol as p
from shared.errors import ConfigError
from shared.limits import MIN_FRAME_BYTES
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

pytest.importorskip("openai")

GPT = "gpt-4.1-mini"
BIG = "x" * 250_000  # under the daemon's --max-output-bytes (256 KiB), over a 200 KB frame


def answer(text: str) -> Scripted:
    """A Chat Completions answer with the given text."""
    return Scripted(
        body={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": GPT,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        }
    )


def openai_flag(url: str) -> str:
    """tallyd's --executor value for the fake provider, SDK retries off."""
    return "openai=" + json.dumps({"base_url": url + "/v1", "api_key": "t", "max_retries": 0})


async def test_a_result_over_the_frame_limit_is_fitted_and_the_daemon_goes_on(
    db_url: str, tmp_path: Path
) -> None:
    """tally serve --max-frame-bytes 200000 and a 250 KB answer: the daemon sends a result cut
    under the advertised limit (marked cut), the job succeeds with its usage, and the next job
    on the same daemon succeeds too (the link was never closed for size)."""
    provider = FakeProvider([answer(BIG), answer("small")])
    with serving(provider) as url:
        async with running_service(db_url, max_frame_bytes=200_000) as service:
            daemon = start_daemon(
                ws_url(service), tmp_path / "d", "--executor", openai_flag(url), concurrency=1
            )
            try:
                async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                    job = p.JobSpec(executor="openai", model=GPT, spec={"prompt": "hi"})
                    [first] = await submit_early(client, [job])
                    done = (await client.wait([first], timeout=scaled(60)))[first]
                    [second] = await client.submit([job])
                    then = (await client.wait([second], timeout=scaled(60)))[second]
            finally:
                await stop_daemon_async(daemon)
    assert done.status == "succeeded", done
    assert then.status == "succeeded" and then.output == "small", then
    [execution] = await fetch(
        db_url,
        "SELECT status, output, output_truncated, input_tokens, output_tokens"
        " FROM executions WHERE job_id = $1",
        first,
    )
    assert execution["status"] == "succeeded" and execution["output_truncated"] is True
    assert 100_000 < len(execution["output"]) < 200_000
    assert set(execution["output"]) == {"x"}
    assert (execution["input_tokens"], execution["output_tokens"]) == (10, 20)
    assert len(provider.requests) == 2


class _ShrinkingOrchestrator:
    """Speaks enough tally/1 to run one job on a real tallyd: the first session advertises no
    frame limit and acknowledges nothing, then closes; the second advertises 200,000 bytes and
    acknowledges what is resent."""

    LIMIT = 200_000

    def __init__(self) -> None:
        self.offer = p.make(
            p.JobOffer,
            p.OfferPayload(
                job_id=p.new_id(), attempt=1, executor="openai", model=GPT, spec={"prompt": "hi"}
            ),
        )
        self.sessions = 0
        self.results: list[tuple[int, int, p.JobResult]] = []  # (session, bytes, frame)
        self.first_result = asyncio.Event()
        self.resent = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        register = p.decode_daemon_frame(await ws.recv())
        assert isinstance(register, p.DaemonRegister)
        self.sessions += 1
        session = self.sessions
        limit: Any = self.LIMIT if session > 1 else p.UNSET
        registered = p.RegisteredPayload(
            heartbeat_interval_ms=60_000,
            offer_timeout_ms=60_000,
            lease_timeout_ms=60_000,
            resumed=[self.offer.id] if session > 1 else [],
            max_frame_bytes=limit,
        )
        await ws.send(p.encode(p.make(p.DaemonRegistered, registered, register.id)).decode())
        if session == 1:
            await ws.send(p.encode(self.offer).decode())
        async for data in ws:
            frame = p.decode_daemon_frame(data)
            if isinstance(frame, p.JobResult):
                self.results.append((session, len(data), frame))
                if session == 1:
                    self.first_result.set()
                    continue
                ack = p.make(p.JobAck, p.AckPayload(of="job:result"), frame.id)
                await ws.send(p.encode(ack).decode())
                self.resent.set()
            elif isinstance(frame, p.JobGeneration) and session > 1:
                ack = p.make(
                    p.JobAck, p.AckPayload(of="job:generation", seq=frame.payload.seq), frame.id
                )
                await ws.send(p.encode(ack).decode())


async def test_a_stored_result_is_refitted_for_a_smaller_limit(tmp_path: Path) -> None:
    """A result stored in the outbox under no advertised limit (250 KB) and resent to an
    orchestrator advertising 200,000 bytes: the resent frame is fitted under it (the answer
    cut and marked, the usage kept), and once acknowledged it is not sent again."""
    fake = _ShrinkingOrchestrator()
    provider = FakeProvider([answer(BIG)])
    with serving(provider) as url:
        async with serve(fake.handler, "127.0.0.1", 0, max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            daemon = start_daemon(
                f"ws://127.0.0.1:{port}", tmp_path / "d", "--executor", openai_flag(url)
            )
            try:
                await asyncio.wait_for(fake.first_result.wait(), scaled(30))
                for ws in list(server.connections):
                    await ws.close()
                await asyncio.wait_for(fake.resent.wait(), scaled(30))
                # One more reconnect: the acknowledged result is not sent again.
                for ws in list(server.connections):
                    await ws.close()
                loop = asyncio.get_running_loop()
                deadline = loop.time() + scaled(15)
                while fake.sessions < 3 and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                assert fake.sessions == 3
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await stop_daemon_async(daemon)
    (s1, size1, first), (s2, size2, resent) = fake.results
    assert (s1, s2) == (1, 2) and size1 > fake.LIMIT
    assert size2 <= fake.LIMIT
    r = resent.payload
    assert r.success is True and r.output_truncated is True
    assert isinstance(r.output, str) and set(r.output) == {"x"} and len(r.output) > 100_000
    assert (r.input_tokens, r.output_tokens) == (10, 20)
    assert resent.id == first.id == fake.offer.id


def test_serve_refuses_a_frame_limit_below_the_floor() -> None:
    """tally serve --max-frame-bytes below 131072 exits 2 naming the flag (no frame a daemon
    builds is guaranteed to fit under less); the settings refuse it the same way."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "serve",
            "--insecure",
            "--max-frame-bytes",
            "131071",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "--max-frame-bytes" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(ConfigError, match="--max-frame-bytes"):
        ServeSettings(
            database_url="", insecure=True, max_frame_bytes=MIN_FRAME_BYTES - 1
        ).validate()
    ServeSettings(database_url="", insecure=True, max_frame_bytes=MIN_FRAME_BYTES).validate()

"""``tally bench jobs``: full round trips (submit, dispatch, execute, result, persist) per second.

A real ``tally serve`` and D real ``tallyd`` processes with the simulated executor at zero
latency (one call per job); a client submits N jobs and waits for all of them to finish.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from orchestrator.bench.ingest import bench_database, spawn_serve
from orchestrator.client import TallyClient
from shared import protocol as p


async def run(
    n_jobs: int, daemons: int, database_url: str | None, data_dir: Path | None
) -> dict[str, Any]:
    """Run the benchmark and return its JSON-able summary."""
    async with bench_database(database_url, data_dir) as dsn:
        with ExitStack() as stack:  # children stop before the database is dropped
            daemon_token, client_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            port, _ = await spawn_serve(stack, dsn, daemon_token, client_token)
            env = {**os.environ}
            state = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            for i in range(daemons):
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "daemon",
                        "--orchestrator",
                        f"ws://127.0.0.1:{port}/ws",
                        "--token",
                        daemon_token,
                        "--state-dir",
                        str(state / f"d{i}"),
                        "--max-concurrent-jobs",
                        "64",
                        "--log-level",
                        "warning",
                    ],
                    env=env,
                )
                stack.callback(proc.wait, 30)
                stack.callback(proc.terminate)
            spec = {"turns": 1, "latencyMs": 0, "promptTokens": 100, "outputTokens": 10}
            async with TallyClient(f"ws://127.0.0.1:{port}/ws", client_token) as client:
                started = time.perf_counter()
                ids = await client.submit(
                    [p.JobSpec(executor="simulated", spec=spec) for _ in range(n_jobs)],
                    allow_unknown_executor=True,  # its daemons are starting beside it
                )
                finals = await client.wait(ids, timeout=600)
                elapsed = time.perf_counter() - started
    succeeded = sum(1 for f in finals.values() if f.status == "succeeded")
    return {
        "bench": "jobs",
        "jobs": n_jobs,
        "daemons": daemons,
        "succeeded": succeeded,
        "seconds": round(elapsed, 3),
        "jobsPerSecond": round(n_jobs / elapsed, 1),
    }

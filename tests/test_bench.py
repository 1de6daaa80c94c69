"""`tally bench`: each benchmark runs end to end at a small size and prints its JSON object.

These check what the benchmarks report (counts, consistency, cleanup), never how fast: speed
is recorded in ``bench/RESULTS.md`` from full-size runs.
"""

from __future__ import annotations

import json

import asyncpg

from tests.test_cli_ops import tally


def test_bench_decode_reports_both_decoders() -> None:
    """`tally bench decode` prints both rates and their ratio."""
    proc = tally("bench", "decode", "--n", "1000")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["bench"] == "decode" and out["frameBytes"] > 800
    assert out["tallyFramesPerSecond"] > 0 and out["pydanticFramesPerSecond"] > 0
    assert out["ratio"] == round(out["tallyFramesPerSecond"] / out["pydanticFramesPerSecond"], 2)


async def _bench_databases(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'tally_bench_%'"
        )
    finally:
        await conn.close()
    return [r[0] for r in rows]


async def test_bench_ingest_records_every_result_once_and_cleans_up(pg_admin_dsn: str) -> None:
    """Every streamed result is acknowledged and recorded once; the bench database is dropped."""
    before = await _bench_databases(pg_admin_dsn)
    proc = tally(
        "bench", "ingest", "--connections", "3", "--results", "300", "--database-url", pg_admin_dsn
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["results"], out["acked"], out["recorded"]) == (300, 300, 300)
    assert out["resultsPerSecond"] > 0 and len(out["copyRoundsRowsPerSecond"]) == 3
    assert out["copyRowsPerSecond"] == sorted(out["copyRoundsRowsPerSecond"])[1]
    assert 0 < out["ackLatencyP50Ms"] <= out["ackLatencyP99Ms"]
    cpu = out["cpuMicrosPerResult"]
    assert set(cpu) == {"serve", "postgres", "copyPostgres", "copyClient"}
    assert cpu["serve"] > 0 and cpu["copyClient"] > 0  # both processes are local here
    assert all(v is None or v > 0 for v in cpu.values())
    assert await _bench_databases(pg_admin_dsn) == before


async def test_bench_jobs_runs_every_job(pg_admin_dsn: str) -> None:
    """Jobs submitted through a real orchestrator and daemons all succeed."""
    before = await _bench_databases(pg_admin_dsn)
    proc = tally("bench", "jobs", "--jobs", "40", "--daemons", "1", "--database-url", pg_admin_dsn)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["jobs"], out["succeeded"]) == (40, 40)
    assert await _bench_databases(pg_admin_dsn) == before

"""``tally bench report``: how long each report takes on a ledger of N executions.

The ledger is seeded server-side (``INSERT ... SELECT`` over ``generate_series``, in chunks):
N succeeded jobs of one execution each, 10 calls per execution alternating between two
models, 20 teams, spread evenly over the last 30 days, with the executions' and jobs' totals
the sums of their calls, and the hourly rollups summed from the same calls. A window of the
rollups is then proven against the detail (as ``tally ledger check``).

Each report form is timed inside this process (the query and the rows built from it, the
median of 15 runs after 3 untimed ones) and through the usage API of a real ``tally serve``
child (the HTTP response time, median likewise). One JSON object names every form with its
times.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from orchestrator.bench.ingest import bench_database, spawn_serve
from orchestrator.store import ledger_check, reports
from orchestrator.store.job_detail import job_detail

TEAMS = 20
CALLS = 10
DAYS = 30
CHUNK = 50_000  # executions per seeding statement
RUNS = 15  # timed runs per form, after WARMUP untimed ones; the median is reported
WARMUP = 3

# The report forms timed: name -> the API's query (the CLI's flags have the same names).
FORMS: dict[str, dict[str, str]] = {
    "by_model_30d": {"by": "model", "since": "30d"},
    "by_team_30d": {"by": "label:team", "since": "30d"},
    "by_model_team_30d": {"by": "model,label:team", "since": "30d"},
    "by_day_30d": {"by": "day", "since": "30d"},
    "by_week_30d": {"by": "week", "since": "30d"},
    "by_hour_7d": {"by": "hour", "since": "7d"},
    "by_day_team_30d": {"by": "day,label:team", "since": "30d"},
    "by_model_one_team_30d": {"by": "model", "since": "30d", "label": "team=t07"},
    "by_provider_model_filter_until_1d": {
        "by": "provider,executor",
        "since": "30d",
        "until": "1d",
        "model": "sim-large",
    },
}

# Per call k (execution) and s (0..9): deterministic, realistic-looking buckets.
_CALL = """
    200 + ((k * 7 + s * 13) % 800) AS input_tokens,
    40 + ((k * 11 + s * 5) % 400) AS output_tokens,
    CASE WHEN s > 0 THEN 1500 + ((k + s) % 500) ELSE 0 END AS cache_read,
    CASE WHEN s = 0 THEN 1500 ELSE 0 END AS cache_creation,
    ((k * 11 + s * 5) % 400) / 4 AS reasoning,
    ((200 + ((k * 7 + s * 13) % 800)) * 3 + (40 + ((k * 11 + s * 5) % 400)) * 15)
        / 1000000.0 AS cost
"""

SEED_CHUNK = f"""
WITH base AS (
    SELECT k, md5('job' || k)::uuid AS job_id, md5('exec' || k)::uuid AS exec_id,
           now() - ($3::double precision * ($1 - k)::double precision / $1)
               * interval '1 day' AS at,
           't' || lpad((k % {TEAMS})::text, 2, '0') AS team
    FROM generate_series($2::bigint, $2 + $4 - 1) AS k
), calls AS (
    SELECT b.k, b.exec_id, s, b.at, {_CALL}
    FROM base b CROSS JOIN generate_series(0, {CALLS - 1}) AS s
), ins_calls AS (
    INSERT INTO llm_calls (execution_id, seq, provider, request_model, response_model,
        finish_reason, input_tokens, output_tokens, cache_read_input_tokens,
        cache_creation_input_tokens, reasoning_tokens, cost_usd, cost_source, duration_ms,
        recorded_at)
    SELECT exec_id, s, 'simulated', CASE WHEN s % 2 = 0 THEN 'sim-small' ELSE 'sim-large' END,
           CASE WHEN s % 2 = 0 THEN 'sim-small' ELSE 'sim-large' END, 'end_turn',
           input_tokens, output_tokens, cache_read, cache_creation, reasoning, cost,
           'price_table', 800, at
    FROM calls
), sums AS (
    SELECT exec_id, sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cache_read) AS r,
           sum(cache_creation) AS w, sum(reasoning) AS x, sum(cost) AS c
    FROM calls GROUP BY exec_id
), ins_jobs AS (
    INSERT INTO jobs (id, executor, model, labels, status, attempts, created_at, started_at,
        finished_at, num_turns, input_tokens, output_tokens, cache_read_input_tokens,
        cache_creation_input_tokens, reasoning_tokens, cost_usd)
    SELECT b.job_id, 'simulated', 'sim-small', jsonb_build_object('team', b.team), 'succeeded',
           1, b.at - interval '20 seconds', b.at - interval '15 seconds', b.at, {CALLS},
           s.i, s.o, s.r, s.w, s.x, s.c
    FROM base b JOIN sums s ON s.exec_id = b.exec_id
)
INSERT INTO executions (id, job_id, attempt, daemon_id, status, offered_at, started_at,
    finished_at, result_recorded_at, num_turns, input_tokens, output_tokens,
    cache_read_input_tokens, cache_creation_input_tokens, reasoning_tokens, cost_usd,
    cost_source, duration_ms)
SELECT b.exec_id, b.job_id, 1, 'bench-report', 'succeeded', b.at - interval '15 seconds',
       b.at - interval '15 seconds', b.at, b.at, {CALLS}, s.i, s.o, s.r, s.w, s.x, s.c,
       'price_table', 15000
FROM base b JOIN sums s ON s.exec_id = b.exec_id
"""

# The rollups of the seeded calls (each execution counted at its first call, seq 0).
SEED_ROLLUPS = """
INSERT INTO usage_hourly (hour, model, provider, executor, labels, input_tokens,
    output_tokens, cache_read_input_tokens, cache_creation_input_tokens, reasoning_tokens,
    cost_usd, calls, executions)
SELECT date_trunc('hour', c.recorded_at, 'UTC'), c.response_model, c.provider, j.executor,
       j.labels, sum(c.input_tokens), sum(c.output_tokens), sum(c.cache_read_input_tokens),
       sum(c.cache_creation_input_tokens), sum(c.reasoning_tokens), sum(c.cost_usd),
       count(*), count(*) FILTER (WHERE c.seq = 0)
FROM llm_calls c JOIN executions e ON e.id = c.execution_id JOIN jobs j ON j.id = e.job_id
GROUP BY 1, 2, 3, 4, 5
"""


async def seed(conn: asyncpg.Connection, executions: int) -> float:
    """Seed the ledger; return the seconds it took."""
    started = time.perf_counter()
    await conn.execute(
        "INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status)"
        " VALUES ('bench-report', 'bench', 'bench', 1, 'disconnected')"
    )
    # The notify trigger would announce every seeded job; foreign keys hold by construction.
    await conn.execute("SET session_replication_role = replica")
    for start in range(0, executions, CHUNK):
        await conn.execute(
            SEED_CHUNK, executions, start, float(DAYS), min(CHUNK, executions - start)
        )
    await conn.execute(SEED_ROLLUPS)
    await conn.execute("SET session_replication_role = DEFAULT")
    await conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


async def _time_query(conn: asyncpg.Connection, params: dict[str, str]) -> tuple[float, int]:
    query = reports.build_query(
        params["by"],
        params["since"],
        params.get("until"),
        [params["label"]] if "label" in params else [],
        params.get("model"),
    )
    samples, n = [], 0
    for _ in range(WARMUP):
        await reports.usage(conn, query)
    for _ in range(RUNS):
        t = time.perf_counter()
        rows = await reports.usage(conn, query)
        samples.append(time.perf_counter() - t)
        n = len(rows)
    return _median_ms(samples), n


def _get(url: str, token: str) -> float:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - t


async def _time_api(port: int, token: str, path: str) -> float:
    url = f"http://127.0.0.1:{port}{path}"
    for _ in range(WARMUP):
        await asyncio.to_thread(_get, url, token)
    samples = [await asyncio.to_thread(_get, url, token) for _ in range(RUNS)]
    return _median_ms(samples)


async def run(executions: int, database_url: str | None, data_dir: Path | None) -> dict[str, Any]:
    """Seed N executions, check a window of the rollups, time every report form."""
    async with bench_database(database_url, data_dir) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            seconds = await seed(conn, executions)
            calls = await conn.fetchval("SELECT count(*) FROM llm_calls")
            rollup_rows = await conn.fetchval("SELECT count(*) FROM usage_hourly")
            since = await conn.fetchval("SELECT now()") - timedelta(days=2)
            _, mismatches = await ledger_check.check(conn, since)
            in_process: dict[str, dict[str, Any]] = {}
            for name, params in FORMS.items():
                ms, n = await _time_query(conn, params)
                in_process[name] = {"ms": ms, "rows": n}
            job = str(
                await conn.fetchval(
                    "SELECT id FROM jobs ORDER BY id LIMIT 1 OFFSET $1", executions // 2
                )
            )
            samples = []
            for i in range(WARMUP + RUNS):
                t = time.perf_counter()
                full = await reports.resolve_job_id(conn, job[:8])
                await job_detail(conn, full)
                if i >= WARMUP:
                    samples.append(time.perf_counter() - t)
            in_process["job_detail"] = {"ms": _median_ms(samples), "rows": 1}
        finally:
            await conn.close()
        client, daemon = secrets.token_hex(16), secrets.token_hex(16)
        api: dict[str, float] = {}
        with ExitStack() as stack:
            port, _ = await spawn_serve(stack, dsn, daemon, client)
            for name, params in FORMS.items():
                api[name] = await _time_api(
                    port, client, "/api/v1/usage?" + urllib.parse.urlencode(params)
                )
            api["job_detail"] = await _time_api(port, client, f"/api/v1/jobs/{job[:8]}")
    return {
        "bench": "report",
        "executions": executions,
        "calls": calls,
        "rollup_rows": rollup_rows,
        "seed_seconds": round(seconds, 1),
        "rollups_checked_last_2_days": {"mismatches": len(mismatches)},
        "runs_per_form": RUNS,
        "forms_ms": {
            name: {
                "query": in_process[name]["ms"],
                "api": api[name],
                "rows": in_process[name]["rows"],
            }
            for name in in_process
        },
        "max_query_ms": max(v["ms"] for v in in_process.values()),
        "max_api_ms": max(api.values()),
    }

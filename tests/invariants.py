"""The ledger's invariants, asserted after end-to-end tests whatever they were written for.

- each job is decided by at most one execution, and a finished job by the one it names;
- no call is stored twice (the primary key holds it) and calls belong to real executions;
- totals equal their parts: a job's totals are the sum of its executions', an execution
  without its result holds the sum of its calls, and one with a result at least the calls
  recorded up to it (a call after its result is outside the result's totals);
- counters equal the ledger: what one orchestrator process counted (tokens, cost, tool
  calls) equals what the ledger recorded during that process's life;
- rollups equal the detail: every hourly rollup row is what the detail rows make it
  (``tally ledger check``).
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from datetime import datetime
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.store import ledger_check

COLUMNS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "reasoning": "reasoning_tokens",
}


def scrape_sync(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics, served as Prometheus text, parsed by prometheus_client's own text parser."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


async def _rows(db_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def assert_one_decider(db_url: str) -> None:
    """No job has two deciding executions; a succeeded job has exactly one succeeded one."""
    rows = await _rows(
        db_url,
        """
        SELECT j.id, j.status,
               count(*) FILTER (
                   WHERE e.status IN ('succeeded', 'failed', 'cancelled')
                     -- a retryable failure followed by another attempt did not decide the job
                     AND NOT (e.status = 'failed' AND e.error_class = 'retryable'
                              AND e.attempt < (SELECT max(x.attempt) FROM executions x
                                               WHERE x.job_id = j.id))
               ) AS d,
               count(*) FILTER (WHERE e.status = 'succeeded') AS ok
        FROM jobs j LEFT JOIN executions e ON e.job_id = j.id
        GROUP BY j.id, j.status
        """,
    )
    for r in rows:
        assert r["d"] <= 1, f"job {r['id']} decided by {r['d']} executions"
        if r["status"] == "succeeded":
            assert r["ok"] == 1, f"succeeded job {r['id']} has {r['ok']} succeeded executions"


async def assert_totals_equal_parts(db_url: str) -> None:
    """Job totals equal the sums of their executions; executions hold their calls."""
    sums = ", ".join(f"sum(e.{c}) AS {c}" for c in COLUMNS.values())
    jobs = await _rows(
        db_url,
        f"""
        SELECT j.id, {", ".join(f"j.{c} AS j_{c}" for c in COLUMNS.values())},
               j.cost_usd AS j_cost, s.*
        FROM jobs j JOIN (
            SELECT e.job_id, {sums}, sum(e.cost_usd) AS cost, count(*) AS n
            FROM executions e GROUP BY e.job_id
        ) s ON s.job_id = j.id
        """,
    )
    for r in jobs:
        for c in COLUMNS.values():
            assert r[f"j_{c}"] == r[c], f"job {r['id']} {c}: {r[f'j_{c}']} != {r[c]}"
        assert r["j_cost"] == r["cost"], f"job {r['id']} cost {r['j_cost']} != {r['cost']}"
    call_sums = ", ".join(f"sum(c.{col}) AS c_{col}" for col in COLUMNS.values())
    execs = await _rows(
        db_url,
        f"""
        SELECT e.id, e.result_recorded_at IS NOT NULL AS done,
               {", ".join(f"e.{c}" for c in COLUMNS.values())}, e.cost_usd, s.*
        FROM executions e JOIN (
            SELECT c.execution_id, {call_sums}, sum(c.cost_usd) AS c_cost
            FROM llm_calls c JOIN executions x ON x.id = c.execution_id
            WHERE x.result_recorded_at IS NULL OR c.recorded_at <= x.result_recorded_at
            GROUP BY c.execution_id
        ) s ON s.execution_id = e.id
        """,
    )
    for r in execs:
        for c in COLUMNS.values():
            mine, calls = r[c], r[f"c_{c}"]
            if not r["done"]:
                assert mine == calls, f"execution {r['id']} {c}: {mine} != calls {calls}"
            elif calls is not None:
                assert mine is not None and mine >= calls, f"execution {r['id']} {c}"


async def ledger_counted_since(db_url: str, since: datetime | None) -> dict[str, float]:
    """What the counters of a process started at ``since`` must hold, from the ledger alone.

    Calls are counted when first recorded, unless their execution's result was recorded
    before them; a result counts its totals beyond all of its execution's calls.
    """
    since_clause = "$1::timestamptz IS NULL OR {col} >= $1"
    out: dict[str, float] = {}
    for bucket, col in {**COLUMNS, "cost": "cost_usd"}.items():
        calls = await _rows(
            db_url,
            f"""
            SELECT coalesce(sum(c.{col}), 0) AS v FROM llm_calls c
            JOIN executions e ON e.id = c.execution_id
            WHERE ({since_clause.format(col="c.recorded_at")})
              AND (e.result_recorded_at IS NULL OR c.recorded_at <= e.result_recorded_at)
            """,
            since,
        )
        results = await _rows(
            db_url,
            f"""
            SELECT coalesce(sum(coalesce(e.{col}, 0) - coalesce(s.v, 0)), 0) AS v
            FROM executions e LEFT JOIN (
                SELECT execution_id, sum(c.{col}) AS v FROM llm_calls c
                JOIN executions x ON x.id = c.execution_id
                WHERE c.recorded_at <= x.result_recorded_at
                GROUP BY execution_id
            ) s ON s.execution_id = e.id
            WHERE e.result_recorded_at IS NOT NULL
              AND ({since_clause.format(col="e.result_recorded_at")})
            """,
            since,
        )
        out[bucket] = float(calls[0]["v"]) + float(results[0]["v"])
    # Tool calls are counted once each, when first recorded.
    [tools] = await _rows(
        db_url,
        f"""
        SELECT count(*) AS n, count(*) FILTER (WHERE error) AS errors FROM tool_calls
        WHERE {since_clause.format(col="recorded_at")}
        """,
        since,
    )
    out["tools"], out["tool_errors"] = float(tools["n"]), float(tools["errors"])
    return out


async def _scrape_all(urls: list[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    metrics: dict[str, list[tuple[dict[str, str], float]]] = {}
    for url in urls:
        for name, samples in (await asyncio.to_thread(scrape_sync, url)).items():
            metrics.setdefault(name, []).extend(samples)
    return metrics


def _counted(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, float]:
    out = {
        bucket: sum(
            v for labels, v in metrics.get("tally_tokens_total", []) if labels["type"] == bucket
        )
        for bucket in COLUMNS
    }
    out["cost"] = sum(v for _, v in metrics.get("tally_cost_usd_total", []))
    out["tools"] = sum(v for _, v in metrics.get("tally_tool_calls_total", []))
    out["tool_errors"] = sum(
        v for labels, v in metrics.get("tally_tool_calls_total", []) if labels["outcome"] == "error"
    )
    return out


async def assert_counters_equal_ledger(
    db_url: str, metrics_url: str | list[str], since: datetime | None = None
) -> None:
    """The token and cost counters of one process (or the sum over the processes sharing a
    database) equal what the ledger recorded meanwhile.

    A batch is visible in the database a moment before its counters move (the commit returns
    to the writer after other sessions can see it), so the ledger is read between two scrapes
    and compared only when the two scrapes agree: no batch landed meanwhile.
    """
    urls = [metrics_url] if isinstance(metrics_url, str) else metrics_url
    for _ in range(100):
        before = _counted(await _scrape_all(urls))
        expected = await ledger_counted_since(db_url, since)
        after = _counted(await _scrape_all(urls))
        if before == after:
            break
        await asyncio.sleep(0.05)
    for bucket in (*COLUMNS, "tools", "tool_errors"):
        assert after[bucket] == expected[bucket], f"{bucket}: counters {after} != ledger {expected}"
    assert math.isclose(after["cost"], expected["cost"], rel_tol=1e-9, abs_tol=1e-9), (
        after,
        expected,
    )


async def assert_rollups_equal_detail(db_url: str) -> None:
    """The hourly rollups equal the detail rows they summarise (as `tally ledger check`)."""
    conn = await asyncpg.connect(db_url)
    try:
        _, mismatches = await ledger_check.check(conn)
    finally:
        await conn.close()
    assert not mismatches, "\n".join(m.describe() for m in mismatches)


async def assert_invariants(
    db_url: str, metrics_url: str | list[str] | None = None, since: datetime | None = None
) -> None:
    """Every invariant; the counters too when a scrape URL is given."""
    await assert_one_decider(db_url)
    await assert_totals_equal_parts(db_url)
    await assert_rollups_equal_detail(db_url)
    if metrics_url is not None:
        await assert_counters_equal_ledger(db_url, metrics_url, since)

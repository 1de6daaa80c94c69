"""Reports at scale: `tally usage` with several dimensions and filters, the usage API, `tally
ledger check` and `tally prune`, through a real `tally serve`, `tallyd` and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from orchestrator.client import TallyClient
from shared import protocol as p
from tests.conftest import scaled
from tests.invariants import assert_rollups_equal_detail, assert_totals_equal_parts
from tests.stack import (
    CLIENT_TOKEN,
    DAEMON_TOKEN,
    fetch,
    http_url,
    running_service,
    start_daemon,
    stop_daemon_async,
    submit_early,
    ws_url,
)
from tests.test_cli_ops import tally


def _get(url: str, token: str | None) -> tuple[int, Any, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers["Content-Type"]


def _usage_cli(db_url: str, *args: str) -> list[dict[str, Any]]:
    done = tally("usage", "--database-url", db_url, "--format", "json", *args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


async def _run_labelled_jobs(service: Any, tmp_path: Path) -> list[str]:
    daemon = start_daemon(ws_url(service), tmp_path / "d")
    try:
        async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
            ids = await submit_early(
                client,
                [
                    p.JobSpec(
                        executor="simulated",
                        model=model,
                        spec={"turns": turns, "cachePrefixTokens": 1000},
                        labels={"team": team, "env": env},
                    )
                    for model, team, env, turns in [
                        ("sim-small", "a", "prod", 2),
                        ("sim-large", "a", "dev", 3),
                        ("sim-small", "b", "prod", 1),
                        ("sim-large", "b", "prod", 2),
                        ("sim-small", "c", "dev", 4),
                    ]
                ],
            )
            await client.wait(ids, timeout=scaled(60))
    finally:
        await stop_daemon_async(daemon)
    return ids


async def test_usage_by_several_dimensions_and_filters_equals_the_ledger(
    db_url: str, tmp_path: Path
) -> None:
    """`--by model,label:team` splits by both; `--label`, `--model`, `--until` filter; the
    sums equal the executions' totals; hour, day and week group the same usage."""
    async with running_service(db_url) as service:
        await _run_labelled_jobs(service, tmp_path)
    totals = dict(
        (
            await fetch(
                db_url,
                "SELECT sum(input_tokens) AS i, sum(output_tokens) AS o, count(*) AS n"
                " FROM executions",
            )
        )[0]
    )
    rows = await asyncio.to_thread(_usage_cli, db_url, "--by", "model,label:team")
    groups = {(r["group"]["model"], r["group"]["label:team"]) for r in rows}
    assert groups == {
        ("sim-small", "a"),
        ("sim-large", "a"),
        ("sim-small", "b"),
        ("sim-large", "b"),
        ("sim-small", "c"),
    }
    assert sum(r["inputTokens"] for r in rows) == totals["i"]
    assert sum(r["executions"] for r in rows) == totals["n"]
    assert all(r["key"] == f"{r['group']['model']} / {r['group']['label:team']}" for r in rows)
    team_a = await asyncio.to_thread(_usage_cli, db_url, "--by", "model", "--label", "team=a")
    assert {r["key"] for r in team_a} == {"sim-small", "sim-large"}
    prod_b = await asyncio.to_thread(
        _usage_cli, db_url, "--by", "label:team", "--label", "env=prod", "--model", "sim-large"
    )
    assert [r["key"] for r in prod_b] == ["b"]
    for dim in ("hour", "day", "week"):
        by_time = await asyncio.to_thread(_usage_cli, db_url, "--by", dim)
        assert sum(r["outputTokens"] for r in by_time) == totals["o"], dim
    assert (
        await asyncio.to_thread(
            _usage_cli, db_url, "--until", "2000-01-01", "--since", "1999-01-01"
        )
        == []
    )
    bad = await asyncio.to_thread(tally, "usage", "--database-url", db_url, "--by", "model,mood")
    assert bad.returncode == 2 and "--by 'mood'" in bad.stderr
    table = await asyncio.to_thread(
        tally, "usage", "--database-url", db_url, "--by", "executor,label:env"
    )
    assert table.returncode == 0 and "Token usage by executor, label:env" in table.stdout
    csv_out = await asyncio.to_thread(
        tally, "usage", "--database-url", db_url, "--by", "model,label:team", "--format", "csv"
    )
    assert csv_out.stdout.splitlines()[0].startswith("model,label:team,key,")


async def test_usage_api_answers_the_cli_json_to_client_tokens_only(
    db_url: str, tmp_path: Path
) -> None:
    """GET /api/v1/usage and /api/v1/jobs/{id} return what the CLI prints; no token: 401; a
    daemon token: 403; a bad parameter: 400 naming it; an unknown job: 404."""
    async with running_service(db_url) as service:
        ids = await _run_labelled_jobs(service, tmp_path)
        query = urllib.parse.urlencode({"by": "model,label:team", "since": "1d"})
        url = http_url(service, f"/api/v1/usage?{query}")
        status, body, ctype = await asyncio.to_thread(_get, url, None)
        assert (status, ctype) == (401, "application/json") and "client token" in body["error"]
        status, body, _ = await asyncio.to_thread(_get, url, DAEMON_TOKEN)
        assert status == 403
        status, body, _ = await asyncio.to_thread(_get, url, CLIENT_TOKEN)
        assert status == 200
        cli = await asyncio.to_thread(
            _usage_cli, db_url, "--by", "model,label:team", "--since", "1d"
        )
        assert body == cli
        filtered = http_url(service, "/api/v1/usage?by=model&label=team%3Da&label=env%3Ddev")
        status, body, _ = await asyncio.to_thread(_get, filtered, CLIENT_TOKEN)
        assert status == 200 and [r["key"] for r in body] == ["sim-large"]
        bad = http_url(service, "/api/v1/usage?by=colour")
        status, body, _ = await asyncio.to_thread(_get, bad, CLIENT_TOKEN)
        assert status == 400 and body["error"].startswith("by 'colour'")
        far = http_url(service, "/api/v1/usage?since=99999999999d")
        status, body, _ = await asyncio.to_thread(_get, far, CLIENT_TOKEN)
        assert status == 400 and body["error"].startswith("since '99999999999d'")
        nul = http_url(service, "/api/v1/usage?label=team%3D%00a")
        status, body, _ = await asyncio.to_thread(_get, nul, CLIENT_TOKEN)
        assert status == 400 and "NUL characters" in body["error"]
        long_model = http_url(service, "/api/v1/usage?model=" + "m" * 5000)
        status, body, _ = await asyncio.to_thread(_get, long_model, CLIENT_TOKEN)
        assert status == 200 and body == []
        unknown = http_url(service, "/api/v1/usage?group=model")
        status, body, _ = await asyncio.to_thread(_get, unknown, CLIENT_TOKEN)
        assert status == 400 and "'group'" in body["error"]
        status, job, _ = await asyncio.to_thread(
            _get, http_url(service, f"/api/v1/jobs/{ids[0][:8]}"), CLIENT_TOKEN
        )
        assert status == 200
        shown = await asyncio.to_thread(
            tally, "jobs", "show", ids[0], "--database-url", db_url, "--format", "json"
        )
        assert job == json.loads(shown.stdout)
        assert len(job["calls"]) == 2 and job["job"]["labels"] == {"team": "a", "env": "prod"}
        status, body, _ = await asyncio.to_thread(
            _get,
            http_url(service, "/api/v1/jobs/00000000-0000-4000-8000-000000000000"),
            CLIENT_TOKEN,
        )
        assert status == 404
        status, body, _ = await asyncio.to_thread(
            _get, http_url(service, "/api/v1/jobs/zz"), CLIENT_TOKEN
        )
        assert status == 400


async def _snapshot(db_url: str) -> tuple[list[Any], list[Any]]:
    rollups = await fetch(db_url, "SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 6")
    jobs = await fetch(
        db_url,
        "SELECT id, input_tokens, output_tokens, cache_read_input_tokens,"
        " cache_creation_input_tokens, reasoning_tokens, cost_usd, unpriced_calls"
        " FROM jobs ORDER BY id",
    )
    return [tuple(r.values()) for r in rollups], [tuple(r.values()) for r in jobs]


async def test_prune_leaves_rollups_and_job_totals_and_the_check_holds(
    db_url: str, tmp_path: Path
) -> None:
    """Pruning calls, then whole jobs' detail, in small batches: every rollup row and job
    total is unchanged, `tally ledger check` still passes from the cut, and reports are the
    same; a tampered rollup makes the check exit 1 naming the row."""
    async with running_service(db_url) as service:
        ids = await _run_labelled_jobs(service, tmp_path)
    # Age the ledger by two hours, as if it ran then (rollups move with their detail).
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            """
            UPDATE llm_calls SET recorded_at = recorded_at - interval '2 hours';
            UPDATE executions SET result_recorded_at = result_recorded_at - interval '2 hours',
                finished_at = finished_at - interval '2 hours',
                offered_at = offered_at - interval '2 hours';
            UPDATE jobs SET finished_at = finished_at - interval '2 hours';
            UPDATE usage_hourly SET hour = hour - interval '2 hours';
            """
        )
    finally:
        await conn.close()
    await assert_rollups_equal_detail(db_url)
    before = await _snapshot(db_url)
    report = await asyncio.to_thread(_usage_cli, db_url, "--by", "model,label:team")
    pruned = await asyncio.to_thread(
        tally, "prune", "--database-url", db_url, "--calls-before", "1h", "--batch", "3"
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 12 calls" in pruned.stdout
    assert (await fetch(db_url, "SELECT count(*) AS n FROM llm_calls"))[0]["n"] == 0
    assert await _snapshot(db_url) == before
    check = await asyncio.to_thread(tally, "ledger", "check", "--database-url", db_url)
    assert check.returncode == 0 and "rollups equal the detail" in check.stdout
    jobs = await asyncio.to_thread(
        tally, "prune", "--database-url", db_url, "--executions-before", "1h", "--batch", "20"
    )
    assert jobs.returncode == 0 and "of 5 jobs" in jobs.stdout, jobs.stdout + jobs.stderr
    assert (await fetch(db_url, "SELECT count(*) AS n FROM executions"))[0]["n"] == 0
    assert await _snapshot(db_url) == before
    assert await asyncio.to_thread(_usage_cli, db_url, "--by", "model,label:team") == report
    await assert_totals_equal_parts(db_url)
    shown = await asyncio.to_thread(tally, "jobs", "show", ids[0], "--database-url", db_url)
    assert shown.returncode == 0 and "detail pruned at" in shown.stdout
    # A rollup row the detail does not explain, inside the checked window:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO usage_hourly (hour, model, provider, executor, calls)"
            " VALUES (date_trunc('hour', now(), 'UTC'), 'ghost', 'x', 'y', 1)"
        )
    finally:
        await conn.close()
    check = await asyncio.to_thread(tally, "ledger", "check", "--database-url", db_url)
    assert check.returncode == 1
    assert "model=ghost" in check.stderr and "in the rollups, not in the detail" in check.stderr
    bad = await asyncio.to_thread(tally, "prune", "--database-url", db_url)
    assert bad.returncode == 2 and "--calls-before" in bad.stderr

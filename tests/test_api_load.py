"""The usage API under load never starves the orchestrator (issue 25, item 15), its cap, row
limits and statement timeout, and the optional /metrics token (item 17).

The load test runs a real ``tally serve`` process with 2-second leases and offers, real
``tallyd`` processes running simulated jobs with latency, and 200 requests in flight at every
moment on heavy reports over a seeded ledger, from this test process.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from orchestrator.bench.api import USAGE_PATHS, http_get, load, scrape_lost, seed_ledger
from orchestrator.client import TallyClient
from orchestrator.store import reports
from shared import protocol as p
from tests.conftest import scaled
from tests.invariants import assert_invariants
from tests.stack import (
    CLIENT_TOKEN,
    DAEMON_TOKEN,
    fetch,
    free_port,
    http_url,
    running_service,
    serve_process,
    start_daemon,
    stop_daemon_async,
    submit_early,
    wait_for,
    ws_url,
)

MAX_ROWS = 1000
METRICS_TOKEN = "metrics-token-0123456789"


def _get(url: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def _ready(port: int) -> bool:
    try:
        status, _, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz", None)
    except OSError:
        return False
    return status == 200


async def test_heavy_api_load_loses_and_reruns_no_execution(db_url: str, tmp_path: Path) -> None:
    """200 heavy usage and job requests in flight at once, with one client token, while 150
    jobs run under 2 s leases: no execution is lost or run twice, every answer is 200 or 503
    (never 500, never a dropped connection), and no answer holds more than --api-max-rows."""
    long_job, _ = await seed_ledger(db_url, 10_000, 3000)
    [row] = await fetch(db_url, "SELECT now() AS t")
    started_at = row["t"]
    port = free_port()
    serve = serve_process(
        db_url,
        port,
        tmp_path / "serve.log",
        *("--lease-timeout", "2", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "2"),
        *("--offer-timeout", "2", "--api-max-rows", str(MAX_ROWS), "--log-level", "warning"),
    )
    daemons = []
    try:
        await wait_for(lambda: _ready(port), scaled(60))
        url = f"ws://127.0.0.1:{port}/ws"
        daemons = [
            start_daemon(url, tmp_path / f"d{i}", concurrency=16, log=tmp_path / f"d{i}.log")
            for i in range(2)
        ]
        spec = {"turns": 3, "latencyMs": 300, "promptTokens": 100, "outputTokens": 10}
        paths = [*USAGE_PATHS, f"/api/v1/jobs/{long_job}"]
        async with TallyClient(url, CLIENT_TOKEN) as client:
            ids = await submit_early(
                client,
                [p.JobSpec(executor="simulated", spec=spec, labels={"t": "load"})] * 150,
            )
            stop = asyncio.Event()
            loader = asyncio.create_task(load(port, CLIENT_TOKEN, paths, 200, stop))
            try:
                finals = await client.wait(ids, timeout=scaled(240))
            finally:
                stop.set()
            samples = await loader
        assert {f.status for f in finals.values()} == {"succeeded"}
        statuses = {s.status for s in samples}
        assert statuses <= {200, 503}, [s for s in samples if s.status not in (200, 503)][:3]
        ok = [s for s in samples if s.status == 200]
        assert ok, "no request was answered"
        refused = [s for s in samples if s.status == 503]
        assert all(s.retry_after == "1" for s in refused), {(s.path, s.error) for s in refused}
        assert all(s.rows is not None and s.rows <= MAX_ROWS for s in ok)
        by_hour = [s for s in ok if s.path == USAGE_PATHS[0]]
        assert by_hour and all(s.rows == MAX_ROWS and s.truncated for s in by_hour)
        detail = [s for s in ok if s.path.startswith("/api/v1/jobs/")]
        assert detail and all(s.rows == MAX_ROWS and s.truncated for s in detail)
        [lost] = await fetch(db_url, "SELECT count(*) AS n FROM executions WHERE status = 'lost'")
        assert lost["n"] == 0
        twice = await fetch(
            db_url,
            "SELECT job_id FROM executions WHERE started_at IS NOT NULL"
            " GROUP BY job_id HAVING count(*) > 1",
        )
        assert twice == []
        assert await asyncio.to_thread(scrape_lost, port) == 0
        for daemon in daemons:
            await stop_daemon_async(daemon)
        await assert_invariants(db_url, f"http://127.0.0.1:{port}/metrics", started_at)
    finally:
        for daemon in daemons:
            await stop_daemon_async(daemon)
        serve.terminate()
        await asyncio.to_thread(serve.wait, 30)


async def test_api_over_its_cap_answers_503_with_retry_after(db_url: str) -> None:
    """With one turn taken by a report blocked in the database, another request waits
    --api-queue-timeout and gets 503 with Retry-After; the blocked report is stopped by
    --api-statement-timeout with a 503 saying so; afterwards the API answers 200."""
    blocker = await asyncpg.connect(db_url)
    try:
        async with running_service(
            db_url,
            api_pool_size=1,
            api_max_concurrent=1,
            api_queue_timeout=0.3,
            api_statement_timeout=3.0,
        ) as service:
            port = service.port
            assert port is not None
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE usage_hourly IN ACCESS EXCLUSIVE MODE")
            first = asyncio.create_task(http_get(port, "/api/v1/usage?by=model", CLIENT_TOKEN))

            async def api_waits_on_the_lock() -> bool:
                rows = await blocker.fetch(
                    "SELECT 1 FROM pg_stat_activity"
                    " WHERE application_name = 'tally-api' AND wait_event_type = 'Lock'"
                )
                return bool(rows)

            await wait_for(api_waits_on_the_lock, scaled(10))
            second = await http_get(port, "/api/v1/usage?by=model", CLIENT_TOKEN)
            assert (second.status, second.retry_after) == (503, "1")
            assert second.error is not None and "busy" in second.error
            # The orchestrator's own pool is not the API's: readiness still answers.
            assert await _ready(port)
            answered = await asyncio.wait_for(first, scaled(20))
            # Every 503 says when to ask again: here as long as the statement may run.
            assert answered.status == 503 and answered.retry_after == "3"
            assert answered.error is not None and "--api-statement-timeout" in answered.error
            await tx.rollback()
            after = await http_get(port, "/api/v1/usage?by=model", CLIENT_TOKEN)
            assert after.status == 200
    finally:
        await blocker.close()


def _link(headers: dict[str, str]) -> str | None:
    value = headers.get("Link")
    if value is None:
        return None
    assert value.endswith('>; rel="next"') and headers.get("Tally-Truncated") == "true"
    return value[1 : value.index(">")]


async def test_api_rows_are_capped_and_pages_add_up_to_the_report(db_url: str) -> None:
    """Usage groups and a job's calls and tool calls come at most --api-max-rows per answer,
    with a Link rel=next to the rest; the pages together are the whole report and every call;
    a bad limit or offset is a 400 naming it."""
    long_job, _ = await seed_ledger(db_url, 1000, 250)
    conn = await asyncpg.connect(db_url)
    try:
        full = reports.usage_documents(
            await reports.usage(conn, reports.build_query("day,label:team", "30d"))
        )
        calls = await conn.fetchval(
            "SELECT count(*) FROM llm_calls c JOIN executions e ON e.id = c.execution_id"
            " WHERE e.job_id = $1",
            long_job,
        )
    finally:
        await conn.close()
    assert len(full) > 250 and calls == 250
    async with running_service(db_url, api_max_rows=100) as service:
        pages: list[Any] = []
        next_url: str | None = "/api/v1/usage?by=day,label:team&since=30d"
        while next_url is not None:
            status, headers, body = await asyncio.to_thread(
                _get, http_url(service, next_url), CLIENT_TOKEN
            )
            assert status == 200
            page = json.loads(body)
            assert len(page) <= 100
            pages.extend(page)
            next_url = _link(headers)
        # Pages come in key order: each group once, the same groups as the report.
        keys = [r["key"] for r in pages]
        assert len(set(keys)) == len(keys) and sorted(keys) == sorted(r["key"] for r in full)
        assert sum(r["calls"] for r in pages) == sum(r["calls"] for r in full)

        seen_calls: list[int] = []
        seen_tools: list[int] = []
        next_url = f"/api/v1/jobs/{long_job[:8]}"
        while next_url is not None:
            status, headers, body = await asyncio.to_thread(
                _get, http_url(service, next_url), CLIENT_TOKEN
            )
            assert status == 200
            doc = json.loads(body)
            assert len(doc["calls"]) <= 100 and len(doc["toolCalls"]) <= 100
            assert doc["job"]["id"] == long_job and len(doc["executions"]) == 1
            seen_calls.extend(c["seq"] for c in doc["calls"])
            seen_tools.extend(t["seq"] for t in doc["toolCalls"])
            next_url = _link(headers)
            assert doc.get("truncated", False) == (next_url is not None)
            assert doc.get("next") == next_url
        assert seen_calls == list(range(250)) and seen_tools == list(range(249))

        for query, named in (
            ("by=model&limit=0", "limit '0'"),
            ("by=model&limit=101", "limit '101'"),
            ("by=model&offset=-1", "offset '-1'"),
            ("by=model&offset=x", "offset 'x'"),
        ):
            status, _, body = await asyncio.to_thread(
                _get, http_url(service, f"/api/v1/usage?{query}"), CLIENT_TOKEN
            )
            assert status == 400 and json.loads(body)["error"].startswith(named), query
        status, _, body = await asyncio.to_thread(
            _get, http_url(service, f"/api/v1/jobs/{long_job}?page=2"), CLIENT_TOKEN
        )
        assert status == 400 and "'page'" in json.loads(body)["error"]


async def test_metrics_token_guards_metrics_and_nothing_else(db_url: str) -> None:
    """With --metrics-token, /metrics needs it or a client token (401 otherwise, a daemon
    token included); the metrics token opens neither the API nor the WebSocket."""
    async with running_service(
        db_url, check_invariants=False, metrics_tokens=(METRICS_TOKEN,)
    ) as service:
        url = http_url(service, "/metrics")
        for token, expected in (
            (None, 401),
            ("not-a-token-of-this-server", 401),
            (DAEMON_TOKEN, 401),
            (METRICS_TOKEN, 200),
            (CLIENT_TOKEN, 200),
        ):
            status, headers, body = await asyncio.to_thread(_get, url, token)
            assert status == expected, token
            if status == 200:
                assert b"tally_executions_lost_total" in body
            else:
                assert headers.get("WWW-Authenticate") == 'Bearer realm="tally"'
        status, _, _ = await asyncio.to_thread(
            _get, http_url(service, "/api/v1/usage"), METRICS_TOKEN
        )
        assert status == 401
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                ws_url(service), additional_headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            ):
                pass
        assert refused.value.response.status_code == 401
    # Without the flag /metrics stays open, as before.
    async with running_service(db_url, check_invariants=False) as service:
        status, _, _ = await asyncio.to_thread(_get, http_url(service, "/metrics"), None)
        assert status == 200


def test_metrics_token_is_checked_at_start() -> None:
    """A short metrics token, or one that is also a daemon or a client token, refuses to
    start (exit 2)."""
    from tests.test_cli_ops import tally

    for token, message in (
        ("short", "at least 16 characters"),
        (DAEMON_TOKEN, "both a daemon token and a metrics token"),
        (CLIENT_TOKEN, "both a client token and a metrics token"),
    ):
        done = tally(
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--daemon-token",
            DAEMON_TOKEN,
            "--client-token",
            CLIENT_TOKEN,
            "--metrics-token",
            token,
            "--database-url",
            "postgresql://nobody@127.0.0.1:1/none",
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr


async def test_every_bad_parameter_is_a_400_naming_it(db_url: str) -> None:
    """Numbers too long for int(), durations of thousands of digits and dates that leave the
    range once in UTC are 400s naming the parameter, never 500s."""
    digits = "9" * 5000
    async with running_service(db_url, check_invariants=False) as service:
        for path, named in (
            (f"/api/v1/usage?limit={digits}", "limit '999"),
            (f"/api/v1/usage?offset={digits}", "offset '999"),
            (f"/api/v1/jobs/00000000?limit={digits}", "limit '999"),
            (f"/api/v1/usage?since={digits}d", "since '999"),
            ("/api/v1/usage?since=0001-01-01T00:00:00%2B14:00", "since '0001-01-01"),
            ("/api/v1/usage?until=9999-12-31T23:59:59-14:00", "until '9999-12-31"),
            ("/api/v1/usage?by=model&after=%5B1%5D", "after '[1]'"),
            ("/api/v1/usage?by=model&after=%5B%22a%22%2C%22b%22%5D", "after '"),
        ):
            status, _, body = await asyncio.to_thread(_get, http_url(service, path), CLIENT_TOKEN)
            assert status == 400, (path[:80], status, body[:200])
            error = json.loads(body)["error"]
            assert error.startswith(named) and len(error) < 300, (path[:80], error)


async def test_after_with_a_lone_surrogate_is_a_400_naming_it(db_url: str) -> None:
    """Review 2, finding 6: an ``after`` key that JSON decodes to a lone surrogate (no UTF-8
    for the database) is a 400 naming ``after``, never a 500."""
    async with running_service(db_url, check_invariants=False) as service:
        path = "/api/v1/usage?by=model&limit=1&after=%5B%22%5Cud800%22%5D"
        status, _, body = await asyncio.to_thread(_get, http_url(service, path), CLIENT_TOKEN)
        assert status == 400, (status, body[:200])
        assert json.loads(body)["error"].startswith("after '")


async def _usage_rows(db_url: str, costs: dict[str, str], shard: int = 0) -> None:
    """One rollup row per model, in the current hour, with these costs (added to a shard's
    rows as the ledger's writers add late usage)."""
    conn = await asyncpg.connect(db_url)
    try:
        for model, cost in costs.items():
            await conn.execute(
                "INSERT INTO usage_hourly (hour, executor, provider, model, labels, shard,"
                " calls, executions, cost_usd, input_tokens)"
                " VALUES (date_trunc('hour', now()), 'simulated', 'simulated', $1, '{}', $3,"
                " 1, 1, $2::numeric, 10)",
                model,
                cost,
                shard,
            )
    finally:
        await conn.close()


async def test_usage_pages_neither_skip_nor_repeat_while_costs_change(db_url: str) -> None:
    """Pages follow the group keys, not the costs: a group whose cost jumps between two pages
    is still answered once, and every group once; a report that fits one answer stays in
    the report's order (cost first)."""
    models = {f"m{i:02d}": str(10 - i) for i in range(10)}  # m00 costs most
    await _usage_rows(db_url, models)
    async with running_service(db_url, check_invariants=False, api_max_rows=3) as service:
        status, headers, body = await asyncio.to_thread(
            _get, http_url(service, "/api/v1/usage?by=model"), CLIENT_TOKEN
        )
        assert status == 200
        keys = [r["key"] for r in json.loads(body)]
        next_url = _link(headers)
        assert next_url is not None and "offset" not in next_url
        # Late usage lands between two pages: m09, not yet answered, now costs the most.
        await _usage_rows(db_url, {"m09": "100"}, shard=1)
        while next_url is not None:
            status, headers, body = await asyncio.to_thread(
                _get, http_url(service, next_url), CLIENT_TOKEN
            )
            assert status == 200
            keys.extend(r["key"] for r in json.loads(body))
            next_url = _link(headers)
        assert keys == sorted(models), keys
    async with running_service(db_url, check_invariants=False) as service:
        status, headers, body = await asyncio.to_thread(
            _get, http_url(service, "/api/v1/usage?by=model"), CLIENT_TOKEN
        )
        assert status == 200 and "Link" not in headers
        whole = json.loads(body)
        assert [r["key"] for r in whole][:2] == ["m09", "m00"]  # cost order, highest first
        assert [r["costUsd"] for r in whole] == sorted((r["costUsd"] for r in whole), reverse=True)


async def test_the_next_page_pins_a_relative_until(db_url: str) -> None:
    """A relative ``until`` (``until=1m``) is pinned in the next page's link to the instant the
    first page read, as ``since`` is, so every page of one report covers one window."""
    conn = await asyncpg.connect(db_url)
    try:  # two hours ago: inside [since, until) whatever the minute of the hour
        for i in range(5):
            await conn.execute(
                "INSERT INTO usage_hourly (hour, executor, provider, model, labels, shard,"
                " calls, executions, cost_usd, input_tokens)"
                " VALUES (date_trunc('hour', now()) - interval '2 hours', 'simulated',"
                " 'simulated', $1, '{}', 0, 1, 1, 1, 10)",
                f"m{i:02d}",
            )
    finally:
        await conn.close()
    async with running_service(db_url, check_invariants=False, api_max_rows=2) as service:
        status, headers, _ = await asyncio.to_thread(
            _get, http_url(service, "/api/v1/usage?by=model&since=2d&until=1m"), CLIENT_TOKEN
        )
        assert status == 200
        next_url = _link(headers)
        assert next_url is not None
        query = parse_qs(urlsplit(next_url).query)
        assert query["until"][0] != "1m" and query["since"][0] != "2d"
        assert datetime.fromisoformat(query["until"][0]) > datetime.fromisoformat(query["since"][0])

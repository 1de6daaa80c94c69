"""Hourly rollups on a real PostgreSQL: the writer's increments equal the detail, whatever the
mix of calls, results, per-model entries, unknown buckets, unpriced calls, late calls and
duplicates; reports read them; pruning leaves them unchanged."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from orchestrator.bench.seed import seed_running_executions
from orchestrator.rollups import Increments, vec
from orchestrator.store import ledger_check, retention
from orchestrator.store.ledger import Incoming, LedgerStore
from shared import protocol as p
from shared.usage import Usage
from tests.invariants import assert_rollups_equal_detail, assert_totals_equal_parts

MODELS = ["sim-small", "sim-large", "claude-x"]


def _call(eid: str, seq: int, rng: random.Random) -> Incoming:
    fields: dict[str, Any] = {}
    for name in (
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "reasoning_tokens",
    ):
        if rng.random() < 0.8:
            fields[name] = rng.randrange(0, 5000)
    if rng.random() < 0.7:
        fields["cost_usd"] = round(rng.random() / 100, 7)
    if rng.random() < 0.8:
        fields["response_model"] = rng.choice(MODELS)
    payload = p.GenerationPayload(seq=seq, provider=rng.choice(["anthropic", "openai"]), **fields)
    return Incoming("d1", p.JobGeneration(id=eid, timestamp=p.now_ms(), payload=payload))


def _result(eid: str, rng: random.Random) -> Incoming:
    fields: dict[str, Any] = {}
    if rng.random() < 0.5:
        entries = []
        for model in rng.sample(MODELS, rng.randint(1, 2)):
            unreported = [f for f in ("reasoningTokens", "costUsd") if rng.random() < 0.2]
            entries.append(
                p.ModelUsage(
                    model=model,
                    input_tokens=rng.randrange(0, 20000),
                    output_tokens=rng.randrange(0, 5000),
                    cache_read_input_tokens=rng.randrange(0, 20000),
                    cache_creation_input_tokens=rng.randrange(0, 2000),
                    cost_usd=round(rng.random() / 10, 7),
                    unreported=unreported or p.UNSET,
                )
            )
        fields["model_usage"] = entries
    if rng.random() < 0.4:
        fields["input_tokens"] = rng.randrange(0, 100000)
        fields["output_tokens"] = rng.randrange(0, 10000)
    if rng.random() < 0.3:
        fields["cost_usd"] = round(rng.random(), 7)
    payload = p.ResultPayload(success=rng.random() < 0.8, **fields)
    return Incoming("d1", p.JobResult(id=eid, timestamp=p.now_ms(), payload=payload))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_rollups_equal_detail_for_any_mix(db_url: str, seed: int) -> None:
    """Random batches of calls and results, some sent twice, some calls after their result:
    the rollups equal the detail, and their all-time sums equal the executions' totals."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(db_url)
    store = LedgerStore(db_url)
    try:
        ids = (await seed_running_executions(conn, ["d1"], 30))["d1"]
        await conn.execute(
            "UPDATE jobs SET labels = jsonb_build_object('team', 't' || (random() * 3)::int)"
        )
        frames: list[Incoming] = []
        for eid in ids:
            calls = [_call(eid, seq, rng) for seq in range(rng.randint(0, 4))]
            frames.extend(calls)
            if rng.random() < 0.85:
                frames.append(_result(eid, rng))
            if calls and rng.random() < 0.2:
                frames.append(_call(eid, 99, rng))  # may land after the result: a call only
        rng.shuffle(frames)
        sent: list[Incoming] = []
        while frames:
            batch = frames[: rng.randint(1, 12)]
            del frames[: len(batch)]
            if sent and rng.random() < 0.3:
                batch.append(rng.choice(sent))  # a redelivered frame
            await store.persist(batch)
            sent.extend(batch)
        await assert_rollups_equal_detail(db_url)
        await assert_totals_equal_parts(db_url)
        sums = await conn.fetchrow(
            "SELECT sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cost_usd) AS c"
            " FROM usage_hourly"
        )
        totals = await conn.fetchrow(
            "SELECT sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cost_usd) AS c"
            " FROM executions"
        )
        assert tuple(sums.values()) == tuple(totals.values())
        calls = await conn.fetchval("SELECT count(*) FROM llm_calls")
        assert await conn.fetchval("SELECT sum(calls) FROM usage_hourly") == calls
        counted = await conn.fetchval(
            "SELECT count(*) FROM executions"
            " WHERE result_recorded_at IS NOT NULL OR num_turns IS NOT NULL"
        )
        assert await conn.fetchval("SELECT sum(executions) FROM usage_hourly") == counted
    finally:
        await store.close()
        await conn.close()


async def test_check_names_a_rollup_the_detail_does_not_explain(db_url: str) -> None:
    """A rollup row changed by hand is reported with the value that differs."""
    conn = await asyncpg.connect(db_url)
    store = LedgerStore(db_url)
    try:
        eid = (await seed_running_executions(conn, ["d1"], 1))["d1"][0]
        await store.persist([_call(eid, 0, random.Random(5))])
        assert (await ledger_check.check(conn))[1] == []
        await conn.execute("UPDATE usage_hourly SET calls = calls + 1")
        _, found = await ledger_check.check(conn)
        assert len(found) == 1 and "calls rollup 2 != detail 1" in found[0].describe()
        await conn.execute("DELETE FROM usage_hourly")
        _, found = await ledger_check.check(conn)
        assert "missing from the rollups" in found[0].describe()
    finally:
        await store.close()
        await conn.close()


def test_increments_keep_unknown_apart_from_zero() -> None:
    """A bucket no call reported stays None; a reported 0 is 0; a late call is a call only."""
    inc = Increments()
    key = ("a", "anthropic", "x", "{}")
    inc.call(key, vec(Usage(input=10, output=0)), Decimal("0.1"), counted=True, first=True)
    inc.call(key, vec(Usage(input=5)), None, counted=True, first=False)
    inc.call(key, vec(Usage(input=99)), Decimal("9"), counted=False, first=False)
    cell = inc.cells[key]
    assert cell.buckets == [15, 0, None, None, None]
    assert (cell.cost, cell.calls, cell.executions, cell.unpriced) == (Decimal("0.1"), 3, 1, 1)
    assert cell.unreported == [0, 1, 2, 2, 2]


async def test_writers_add_to_their_own_shards_and_past_hours_fold_into_one_row(
    db_url: str,
) -> None:
    """Two writers add to separate rows of one key (no waiting on each other); once the hour
    is past, folding leaves one row per key with the same sums, and the check still holds."""
    conn = await asyncpg.connect(db_url)
    writers = [LedgerStore(db_url, shard=3), LedgerStore(db_url, shard=9)]
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        ids = (await seed_running_executions(conn, ["d1"], 2))["d1"]
        rng = random.Random(7)
        for writer, eid in zip(writers, ids, strict=True):
            await writer.persist([_call(eid, 0, rng), _result(eid, rng)])
        before = await conn.fetch(
            "SELECT model, sum(calls) AS calls, sum(input_tokens) AS i, sum(cost_usd) AS c"
            " FROM usage_hourly GROUP BY model ORDER BY model"
        )
        assert {r["shard"] for r in await conn.fetch("SELECT shard FROM usage_hourly")} == {3, 9}
        assert await retention.fold_rollup_shards(pool) == 0  # the current hour stays
        for table, column in (
            ("llm_calls", "recorded_at"),
            ("executions", "result_recorded_at"),
            ("usage_hourly", "hour"),
        ):
            await conn.execute(f"UPDATE {table} SET {column} = {column} - interval '3 hours'")
        assert await retention.fold_rollup_shards(pool) > 0
        assert {r["shard"] for r in await conn.fetch("SELECT shard FROM usage_hourly")} == {0}
        keys = await conn.fetchval(
            "SELECT count(*) = count(DISTINCT (hour, model, provider, executor, labels))"
            " FROM usage_hourly"
        )
        assert keys
        after = await conn.fetch(
            "SELECT model, sum(calls) AS calls, sum(input_tokens) AS i, sum(cost_usd) AS c"
            " FROM usage_hourly GROUP BY model ORDER BY model"
        )
        assert [tuple(r.values()) for r in after] == [tuple(r.values()) for r in before]
        await assert_rollups_equal_detail(db_url)
    finally:
        await pool.close()
        for writer in writers:
            await writer.close()
        await conn.close()


async def test_migration_backfills_the_rollups_of_an_existing_ledger(empty_db_url: str) -> None:
    """A ledger written before migration 0009 (calls, results with and without per-model
    entries, an execution without its result) gets rollups equal to its detail, whose
    all-time sums equal the executions' totals."""
    from orchestrator.store import migrations as migrate

    conn = await asyncpg.connect(empty_db_url)
    try:
        await migrate.up(conn, migrate.discover(), to=8)
        await conn.execute(
            """
            INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status)
            VALUES ('d1', 'h', 'v', 4, 'connected');
            INSERT INTO jobs (id, executor, model, labels, status) VALUES
                ('00000000-0000-4000-8000-000000000001', 'anthropic', 'claude-x',
                 '{"team": "a"}', 'succeeded'),
                ('00000000-0000-4000-8000-000000000002', 'simulated', NULL, '{}', 'running');
            INSERT INTO executions (id, job_id, attempt, daemon_id, status, result_recorded_at,
                finished_at, input_tokens, output_tokens, cost_usd, num_turns) VALUES
                ('00000000-0000-4000-8000-0000000000e1', '00000000-0000-4000-8000-000000000001',
                 1, 'd1', 'succeeded', now(), now(), 130, 20, 0.5, 2),
                ('00000000-0000-4000-8000-0000000000e2', '00000000-0000-4000-8000-000000000002',
                 1, 'd1', 'running', NULL, NULL, 7, NULL, NULL, 1),
                ('00000000-0000-4000-8000-0000000000e3', '00000000-0000-4000-8000-000000000001',
                 2, 'd1', 'lost', now(), now(), 40, 4, 0.1, NULL);
            INSERT INTO llm_calls (execution_id, seq, provider, response_model, input_tokens,
                output_tokens, cost_usd, recorded_at) VALUES
                ('00000000-0000-4000-8000-0000000000e1', 0, 'anthropic', 'claude-x-1', 100, 10,
                 0.25, now() - interval '2 hours'),
                ('00000000-0000-4000-8000-0000000000e1', 1, 'anthropic', 'claude-x-1', 30, 10,
                 NULL, now() - interval '1 hour'),
                ('00000000-0000-4000-8000-0000000000e2', 0, 'simulated', NULL, 7, NULL, NULL,
                 now());
            INSERT INTO execution_model_usage (execution_id, model, provider, input_tokens,
                output_tokens, cache_read_input_tokens, cache_creation_input_tokens, cost_usd)
            VALUES ('00000000-0000-4000-8000-0000000000e1', 'claude-x', NULL, 130, 20, 0, 0, 0.5);
            """
        )
        await migrate.up(conn, migrate.discover())
        assert (await ledger_check.check(conn))[1] == []
        sums = await conn.fetchrow(
            "SELECT sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cost_usd) AS c,"
            " sum(calls) AS n, sum(executions) AS x FROM usage_hourly"
        )
        assert tuple(sums.values()) == (177, 24, Decimal("0.6"), 3, 3)
        by_model = {
            r["model"]: r["i"]
            for r in await conn.fetch(
                "SELECT model, sum(input_tokens) AS i FROM usage_hourly GROUP BY model"
            )
        }
        # The result's entry replaces its calls' model; the calls still count there.
        assert by_model == {"claude-x": 170, "claude-x-1": 0, "simulated": 7}
    finally:
        await conn.close()


async def test_two_orchestrators_streaming_calls_and_results_keep_rollups_exact(
    db_url: str,
) -> None:
    """Two orchestrators (two writer connections each) on one database record calls and
    results of 8 daemons, with redelivered frames: every frame acked, the rollups equal the
    detail, their sums equal the executions', and the counters of both equal the ledger."""
    from orchestrator.bench.loadgen import sample_result, stream_results
    from tests.conftest import scaled
    from tests.invariants import assert_counters_equal_ledger
    from tests.stack import DAEMON_TOKEN, http_url, running_service, ws_url

    conn = await asyncpg.connect(db_url)
    daemons = [f"multi-{i}" for i in range(8)]
    try:
        assigned = await seed_running_executions(conn, daemons, 150)
        await conn.execute(
            "UPDATE jobs SET labels = jsonb_build_object('team', 't' || (random() * 4)::int)"
        )
        since = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    rng = random.Random(11)
    async with (
        running_service(db_url, check_invariants=False) as first,
        running_service(db_url, check_invariants=False) as second,
    ):
        streams = []
        for n, daemon in enumerate(daemons):
            frames: list[p.JobResult | p.JobGeneration] = []
            for i, eid in enumerate(assigned[daemon]):
                calls = [_call(eid, seq, rng).frame for seq in range(rng.randint(0, 3))]
                frames += [f for f in calls if isinstance(f, p.JobGeneration)]
                frames.append(sample_result(eid, i))
            frames += rng.sample(frames, len(frames) // 10)  # redelivered
            service = first if n % 2 else second
            streams.append(stream_results(ws_url(service), DAEMON_TOKEN, daemon, frames))
        stats = await asyncio.wait_for(asyncio.gather(*streams), scaled(180))
        assert all(not s.errors for s in stats)
        urls = [http_url(first, "/metrics"), http_url(second, "/metrics")]
        await assert_counters_equal_ledger(db_url, urls, since)
    await assert_rollups_equal_detail(db_url)
    await assert_totals_equal_parts(db_url)
    conn = await asyncpg.connect(db_url)
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM executions WHERE result_recorded_at IS NOT NULL"
            )
            == 8 * 150
        )
        sums = await conn.fetchrow(
            "SELECT sum(input_tokens) AS i, sum(cost_usd) AS c FROM usage_hourly"
        )
        totals = await conn.fetchrow(
            "SELECT sum(input_tokens) AS i, sum(cost_usd) AS c FROM executions"
        )
        assert tuple(sums.values()) == tuple(totals.values())
    finally:
        await conn.close()

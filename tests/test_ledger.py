"""The ledger store on a real PostgreSQL: what one batch writes, row by row."""

from __future__ import annotations

import json
from decimal import Decimal

import asyncpg

from orchestrator.bench.seed import seed_running_executions
from orchestrator.store.ledger import Incoming, LedgerStore
from shared import protocol as p


def _result(eid: str, **fields: object) -> Incoming:
    payload = p.ResultPayload(success=True, **fields)  # type: ignore[arg-type]
    return Incoming("d1", p.JobResult(id=eid, timestamp=p.now_ms(), payload=payload))


def _entry(model: str, cost: float, **fields: int) -> p.ModelUsage:
    counts = {
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 4,
    }
    return p.ModelUsage(model=model, cost_usd=cost, **{**counts, **fields})


async def _persist(db_url: str, batch: list[Incoming]) -> list[str]:
    store = LedgerStore(db_url)
    try:
        return (await store.persist(batch)).verdicts
    finally:
        await store.close()


async def test_money_is_stored_as_written_and_summed_exactly(db_url: str) -> None:
    """Costs land in NUMERIC as the decimal the sender wrote; an absent total is the exact sum
    of the per-model costs (0.1 + 0.2 is 0.3, not 0.30000000000000004)."""
    conn = await asyncpg.connect(db_url)
    try:
        ids = (await seed_running_executions(conn, ["d1"], 4))["d1"]
        verdicts = await _persist(
            db_url,
            [
                _result(ids[0], cost_usd=1e-7),
                _result(ids[1], cost_usd=123456789.12345679),
                _result(ids[2], model_usage=[_entry("a", 0.1), _entry("b", 0.2)]),
                _result(ids[3], cost_usd=0.1),
            ],
        )
        assert verdicts == ["recorded"] * 4
        costs = {
            str(r["id"]): r["cost_usd"]
            for r in await conn.fetch("SELECT id, cost_usd FROM executions")
        }
        assert costs[ids[0]] == Decimal("1e-7")
        assert costs[ids[1]] == Decimal("123456789.12345679")
        assert costs[ids[2]] == Decimal("0.3")
        assert costs[ids[3]] == Decimal("0.1")
        job_cost = await conn.fetchval(
            "SELECT sum(j.cost_usd) FROM jobs j JOIN executions e ON e.job_id = j.id"
        )
        assert job_cost == Decimal("0.1000001") + Decimal("123456789.12345679") + Decimal("0.3")
    finally:
        await conn.close()


async def test_per_model_rows_and_model_usage_json_match_what_was_sent(db_url: str) -> None:
    """Each modelUsage entry becomes one row (an absent reasoning count stays NULL) and the
    execution keeps the list as sent; a result without modelUsage writes neither."""
    conn = await asyncpg.connect(db_url)
    try:
        ids = (await seed_running_executions(conn, ["d1"], 2))["d1"]
        entries = [
            _entry("claude-sonnet-4-6", 0.0421, reasoning_tokens=300),
            p.ModelUsage(
                model="gpt-4.1-mini",
                provider="openai",
                input_tokens=10**15,
                output_tokens=3_000_000_000,
                cache_read_input_tokens=0,
                cache_creation_input_tokens=0,
                cost_usd=0.0,
            ),
        ]
        verdicts = await _persist(
            db_url,
            [
                _result(ids[0], model_usage=entries),
                _result(ids[1], input_tokens=5, output_tokens=6),
            ],
        )
        assert verdicts == ["recorded", "recorded"]
        rows = await conn.fetch(
            "SELECT execution_id, model, provider, input_tokens, output_tokens,"
            " cache_read_input_tokens, cache_creation_input_tokens, reasoning_tokens, cost_usd"
            " FROM execution_model_usage ORDER BY model"
        )
        assert [tuple(r.values())[1:] for r in rows] == [
            ("claude-sonnet-4-6", None, 1, 2, 3, 4, 300, Decimal("0.0421")),
            ("gpt-4.1-mini", "openai", 10**15, 3_000_000_000, 0, 0, None, Decimal("0.0")),
        ]
        assert {str(r["execution_id"]) for r in rows} == {ids[0]}
        stored = {
            str(r["id"]): r["model_usage"]
            for r in await conn.fetch("SELECT id, model_usage FROM executions")
        }
        assert json.loads(stored[ids[0]]) == json.loads(p.encode_json(entries))
        assert stored[ids[1]] is None
        totals = await conn.fetchrow(
            "SELECT input_tokens, output_tokens, cost_usd FROM executions WHERE id = $1", ids[0]
        )
        assert tuple(totals.values()) == (1 + 10**15, 2 + 3_000_000_000, Decimal("0.0421"))
    finally:
        await conn.close()


async def test_result_for_a_lost_execution_is_recorded_and_leaves_the_job_alone(
    db_url: str,
) -> None:
    """A late result for an execution already marked lost keeps its tokens in the ledger, but
    the job (re-queued for another attempt) keeps its status."""
    conn = await asyncpg.connect(db_url)
    try:
        ids = (await seed_running_executions(conn, ["d1"], 1))["d1"]
        await conn.execute("UPDATE executions SET status = 'lost' WHERE id = $1", ids[0])
        await conn.execute(
            "UPDATE jobs SET status = 'queued' FROM executions e"
            " WHERE e.job_id = jobs.id AND e.id = $1",
            ids[0],
        )
        verdicts = await _persist(db_url, [_result(ids[0], input_tokens=7, cost_usd=0.5)])
        assert verdicts == ["recorded"]
        row = await conn.fetchrow(
            "SELECT e.status, e.input_tokens, e.result_recorded_at IS NOT NULL AS done,"
            " j.status AS job_status FROM executions e JOIN jobs j ON j.id = e.job_id"
        )
        assert (row["status"], row["input_tokens"], row["done"]) == ("lost", 7, True)
        assert row["job_status"] == "queued"
        assert await _persist(db_url, [_result(ids[0], input_tokens=7)]) == ["duplicate"]
    finally:
        await conn.close()


def _call(eid: str, seq: int, **fields: object) -> Incoming:
    payload = p.GenerationPayload(seq=seq, provider="anthropic", **fields)  # type: ignore[arg-type]
    return Incoming("d1", p.JobGeneration(id=eid, timestamp=p.now_ms(), payload=payload))


async def test_calls_are_stored_as_sent_and_summed_exactly_until_the_result(db_url: str) -> None:
    """Each call lands once with its cost as written; the execution's running totals are the
    exact sums of its calls, and a result without totals keeps them."""
    conn = await asyncpg.connect(db_url)
    try:
        eid = (await seed_running_executions(conn, ["d1"], 1))["d1"][0]
        calls = [
            _call(eid, 0, input_tokens=10, output_tokens=1, cost_usd=0.1, response_model="m"),
            _call(eid, 1, input_tokens=20, cache_read_input_tokens=5, cost_usd=0.2),
        ]
        assert await _persist(db_url, calls) == ["recorded", "recorded"]
        assert await _persist(db_url, calls[:1]) == ["duplicate"]
        rows = await conn.fetch(
            "SELECT seq, input_tokens, output_tokens, cache_read_input_tokens, cost_usd,"
            " response_model FROM llm_calls ORDER BY seq"
        )
        assert [tuple(r.values()) for r in rows] == [
            (0, 10, 1, None, Decimal("0.1"), "m"),
            (1, 20, None, 5, Decimal("0.2"), None),
        ]
        running = await conn.fetchrow(
            "SELECT input_tokens, output_tokens, cache_read_input_tokens, cost_usd, num_turns"
            " FROM executions"
        )
        assert tuple(running.values()) == (30, 1, 5, Decimal("0.3"), 2)
        assert await _persist(db_url, [_result(eid)]) == ["recorded"]
        final = await conn.fetchrow(
            "SELECT input_tokens, output_tokens, cache_read_input_tokens, cost_usd, num_turns,"
            " status FROM executions"
        )
        assert tuple(final.values()) == (30, 1, 5, Decimal("0.3"), 2, "succeeded")
    finally:
        await conn.close()


async def test_lease_renewal_skips_rows_a_ledger_batch_holds(db_url: str) -> None:
    """Renewing a daemon's leases neither waits for nor deadlocks with a ledger batch: rows
    the batch holds are skipped (it is recording their results), the others renewed."""
    from orchestrator.store.jobs import JobStore
    from shared.aio import within

    conn = await asyncpg.connect(db_url)
    holder = await asyncpg.connect(db_url)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        ids = sorted((await seed_running_executions(conn, ["d1"], 2))["d1"])
        await conn.execute("UPDATE executions SET lease_expires_at = now()")
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", ids[1])
            await within(JobStore(pool, 1.0).extend_leases(ids, 3600), 5)
        leases = {
            str(r["id"]): r["renewed"]
            for r in await conn.fetch(
                "SELECT id, lease_expires_at > now() + interval '1 minute' AS renewed"
                " FROM executions"
            )
        }
        assert leases == {ids[0]: True, ids[1]: False}
    finally:
        await pool.close()
        await holder.close()
        await conn.close()


async def test_nul_characters_do_not_cost_a_result_its_tokens(db_url: str) -> None:
    """PostgreSQL text cannot hold U+0000: it is stored as U+FFFD, and the result, its
    per-model rows and its costs are recorded exactly; a literal backslash-u text is kept."""
    conn = await asyncpg.connect(db_url)
    try:
        ids = (await seed_running_executions(conn, ["d1"], 2))["d1"]
        verdicts = await _persist(
            db_url,
            [
                _result(
                    ids[0],
                    error_message="bad\x00byte",
                    model_usage=[_entry("m\x00x", 0.1)],
                    cost_usd=123456789.12345679,
                ),
                _result(ids[1], error_message="literal \\u0000 text", input_tokens=3),
            ],
        )
        assert verdicts == ["recorded", "recorded"]
        rows = {
            str(r["id"]): tuple(r.values())[1:]
            for r in await conn.fetch("SELECT id, error, input_tokens, cost_usd FROM executions")
        }
        assert rows[ids[0]] == ("bad\ufffdbyte", 1, Decimal("123456789.12345679"))
        assert rows[ids[1]] == ("literal \\u0000 text", 3, None)
        assert await conn.fetchval("SELECT model FROM execution_model_usage") == "m\ufffdx"
    finally:
        await conn.close()


def test_metrics_cap_models_and_skip_models_that_used_nothing() -> None:
    """Token counters add a batch's per-(provider, model) sums; models past the cap share the
    ``other`` series, and a model whose sums are all zero takes no place under the cap."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from orchestrator.metrics import Metrics
    from orchestrator.store.ledger import BatchOutcome, count
    from shared.usage import Usage

    metrics = Metrics(label_cap=2)
    outcome = BatchOutcome(verdicts=[])
    count(outcome.counted, "p", "idle", Usage(0, 0, 0, 0, None), 0.0)
    for model in ("a", "b", "c", "d"):
        count(outcome.counted, "p", model, Usage(10, 1, 0, 0, None), 0.5)
    metrics.record_batch(outcome)
    text = generate_latest(metrics.registry).decode()
    inputs = {
        s.labels["model"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "tally_tokens_total" and s.labels["type"] == "input"
    }
    assert inputs == {"a": 10, "b": 10, "other": 20}

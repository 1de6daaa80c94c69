"""Budgets at their edges (issue 25, items 5 to 9, 11 to 13 and 17): real PostgreSQL, real
`tally serve` (in process, or a process), raw protocol daemons, the real `tally` CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from orchestrator.client import TallyClient
from orchestrator.store import JobStore
from orchestrator.store import budgets as store
from orchestrator.store import migrations as migrate
from orchestrator.store.db import create_pool
from orchestrator.store.spend import ClosedSpend
from shared import protocol as p
from shared.limits import MAX_COUNTER
from tests.conftest import scaled
from tests.invariants import _scrape_all
from tests.rawdaemon import RawDaemon
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    http_url,
    running_service,
    submit_early,
    wait_for,
    ws_url,
)


def tally(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `tally` CLI against the test database."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--database-url", db_url],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def put_budget(db_url: str, name: str, selector: dict[str, str], **columns: Any) -> None:
    """Write a budget row directly (as an older release, or SQL by hand, could have)."""
    values = {
        "limit_usd": Decimal(10),
        "period": "day",
        "action": "hold",
        "default_reservation_usd": Decimal("0.10"),
        **columns,
    }
    names = ", ".join(values)
    marks = ", ".join(f"${i + 3}" for i in range(len(values)))
    await fetch(
        db_url,
        f"INSERT INTO budgets (name, selector, {names}) VALUES ($1, $2::jsonb, {marks})",
        name,
        json.dumps(selector),
        *values.values(),
    )


async def submit(service: Any, jobs: list[p.JobSpec]) -> list[str]:
    async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
        return await submit_early(client, jobs)


def job(labels: dict[str, str], **fields: Any) -> p.JobSpec:
    return p.JobSpec(executor="simulated", spec={"turns": 1}, labels=labels, **fields)


async def execute(db_url: str, script: str) -> None:
    """Run SQL statements (no parameters) on their own connection."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


def get_json(url: str) -> tuple[int, Any]:
    """GET a usage API URL with the client token: the status and the decoded body."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def jobs_failed_counted(service: Any) -> float:
    scraped = await _scrape_all([http_url(service, "/metrics")])
    return sum(v for lb, v in scraped.get("tally_jobs_total", []) if lb["outcome"] == "failed")


# --- item 5: limits are never dropped -----------------------------------------------------


def test_budgets_set_refuses_values_the_wire_cannot_carry(db_url: str) -> None:
    """`tally budgets set` exits 2 naming the flag for a token limit above 2^53-1, and for a
    NaN, infinite or negative amount."""
    for args, flag in (
        (("--limit-usd", "10", "--limit-tokens", "10000000000000000"), "--limit-tokens"),
        (("--limit-usd", "10", "--default-reservation-tokens", str(MAX_COUNTER + 1)), "tokens"),
        (("--limit-usd", "NaN"), "--limit-usd"),
        (("--limit-usd", "inf"), "--limit-usd"),
        (("--limit-usd", "-0.5"), "--limit-usd"),
        (("--limit-usd", "1", "--default-reservation-usd", "Infinity"), "--default-reservation"),
        (("--limit-usd", "1e10"), "--limit-usd"),
    ):
        out = tally(db_url, "budgets", "set", "big", "--selector", "case=a", *args)
        assert out.returncode == 2 and flag in out.stderr, (args, out.returncode, out.stderr)
    ok = tally(
        db_url, "budgets", "set", "big", "--selector", "case=a", "--limit-usd", "10",
        "--limit-tokens", str(MAX_COUNTER),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr


async def test_a_huge_token_limit_is_clamped_and_the_jobs_own_limits_kept(db_url: str) -> None:
    """A budget row whose token room is above the wire's 2^53-1 reserves (and offers) at most
    2^53-1 tokens, and the offer keeps the job's own maxTurns, timeoutMs and budgetUsd."""
    await put_budget(db_url, "big", {"case": "a"}, limit_tokens=10**16)
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d-big", capacity=1)
        await daemon.connect()
        limits = p.Limits(max_turns=3, timeout_ms=60_000, budget_usd=0.5)
        await submit(service, [job({"case": "a"}, limits=limits)])
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        got = offer.payload.limits
        assert (got.max_turns, got.timeout_ms, got.budget_usd) == (3, 60_000, 0.5)
        assert got.max_total_tokens == MAX_COUNTER
        await daemon.accept(offer)
        await daemon.finish(offer)
        await daemon.close()
    rows = await fetch(db_url, "SELECT max(tokens) AS t FROM budget_reservations")
    assert rows[0]["t"] is None or rows[0]["t"] <= MAX_COUNTER


async def test_limits_that_cannot_be_offered_fail_the_job_instead(db_url: str) -> None:
    """A job whose stored limits do not convert to the wire's is failed with the cause (and
    counted once), never offered with its limits dropped."""
    async with running_service(db_url) as service:
        [job_id] = await submit(service, [job({}, limits=p.Limits(max_turns=2))])
        await fetch(
            db_url,
            """UPDATE jobs SET limits = '{"maxTurns": "two", "timeoutMs": 1000}'::jsonb
               WHERE id = $1""",
            job_id,
        )
        daemon = RawDaemon(ws_url(service), "d-limits", capacity=1)
        await daemon.connect()

        async def failed() -> bool:
            rows = await fetch(db_url, "SELECT status FROM jobs WHERE id = $1", job_id)
            return bool(rows[0]["status"] == "failed")

        await wait_for(failed, scaled(10))
        with pytest.raises(TimeoutError):
            await daemon.next_of(p.JobOffer, timeout=0.5)
        [row] = await fetch(db_url, "SELECT error, stop_reason FROM jobs WHERE id = $1", job_id)
        assert "limits.maxTurns" in row["error"] and row["stop_reason"] == "error"
        assert await jobs_failed_counted(service) == 1
        await daemon.close()


# --- item 6: held jobs never starve others ------------------------------------------------


async def test_held_jobs_do_not_starve_an_unbudgeted_job_behind_them(db_url: str) -> None:
    """Ten priority-10 jobs held by an exhausted budget do not stop a priority-0 job without a
    budget: it is offered at once, not after the held jobs' recheck (60 s here)."""
    await put_budget(db_url, "spent", {"team": "held"}, limit_usd=Decimal(0))
    async with running_service(db_url, budget_recheck=60.0) as service:
        held = [job({"team": "held"}, priority=10) for _ in range(10)]
        await submit(service, held)

        async def all_held() -> bool:
            rows = await fetch(
                db_url, "SELECT count(*) AS n FROM jobs WHERE hold_reason IS NOT NULL"
            )
            return bool(rows[0]["n"] == 10)

        daemon = RawDaemon(ws_url(service), "d-starve", capacity=2)
        await daemon.connect()
        await wait_for(all_held, scaled(10))
        [free_id] = await submit(service, [job({"team": "other"}, priority=0)])
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert offer.payload.job_id == free_id
        await daemon.accept(offer)
        await daemon.finish(offer)
        await daemon.close()


# --- item 7: several token budgets, and maxTotalTokens 0 ----------------------------------


async def test_two_token_budgets_reserve_the_least_either_allows(db_url: str) -> None:
    """A wide token budget (first by name, no default reservation) and a narrow one matching
    the same job: the job is offered with the narrow budget's room as its maxTotalTokens; a
    job's own maxTotalTokens 0 is offered as 0, not replaced by a default."""
    await put_budget(db_url, "a-wide", {"team": "x"}, limit_tokens=10**9)
    await put_budget(db_url, "b-narrow", {"team": "x", "project": "y"}, limit_tokens=5000)
    labels = {"team": "x", "project": "y"}
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d-tokens", capacity=1)
        await daemon.connect()
        await submit(service, [job(labels)])
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert offer.payload.limits.max_total_tokens == 5000
        await daemon.accept(offer)
        await daemon.finish(offer, tokens=10)
        await submit(service, [job(labels, limits=p.Limits(max_total_tokens=0))])
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert offer.payload.limits.max_total_tokens == 0
        await daemon.accept(offer)
        await daemon.finish(offer, tokens=0)
        await daemon.close()


# --- item 8: spend and reservations in one snapshot ---------------------------------------


async def test_spend_and_reservations_are_read_in_one_snapshot(db_url: str) -> None:
    """While ledger-like transactions move cost from a running attempt's reservation into
    the rollups, every reading of the budget has spent + reserved equal to the reservation
    (two statements could see the spend before a commit and the reservation after it)."""
    conn = await asyncpg.connect(db_url)
    await conn.execute(
        "INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status) "
        "VALUES ('d8', 'h', 'v', 1, 'connected')"
    )
    job_id, execution_id = str(uuid.uuid4()), str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO jobs (id, executor, labels, status, attempts) "
        "VALUES ($1, 'simulated', '{\"team\": \"s\"}', 'running', 1)",
        job_id,
    )
    await conn.execute(
        "INSERT INTO executions (id, job_id, attempt, daemon_id, status, cost_usd) "
        "VALUES ($1, $2, 1, 'd8', 'running', 0)",
        execution_id,
        job_id,
    )
    await conn.close()
    # Lifetime: a day period would reset the spend (not the reservation) at midnight.
    await put_budget(db_url, "snap", {"team": "s"}, limit_usd=Decimal(100), period="lifetime")
    await fetch(
        db_url,
        "INSERT INTO budget_reservations (budget, execution_id, amount_usd) "
        "VALUES ('snap', $1, 50)",
        execution_id,
    )
    step = Decimal("0.001")
    stop = asyncio.Event()

    async def ledger() -> None:
        writer = await asyncpg.connect(db_url)
        try:
            while not stop.is_set():
                async with writer.transaction():
                    await writer.execute(
                        "UPDATE executions SET cost_usd = cost_usd + $2 WHERE id = $1",
                        execution_id,
                        step,
                    )
                    await writer.execute(
                        """
                        INSERT INTO usage_hourly AS t (hour, model, provider, executor, labels,
                            cost_usd, calls)
                        VALUES (date_trunc('hour', now(), 'UTC'), 'm', 'p', 'simulated',
                                '{"team": "s"}', $1, 1)
                        ON CONFLICT (hour, executor, provider, model, labels_key, shard)
                        DO UPDATE SET cost_usd = t.cost_usd + excluded.cost_usd,
                            calls = t.calls + 1
                        """,
                        step,
                    )
        finally:
            await writer.close()

    reader = await asyncpg.connect(db_url)
    task = asyncio.create_task(ledger())
    try:
        for _ in range(300):
            [standing] = await store.report(reader, datetime.now(UTC))
            assert standing.spent_usd + standing.reserved_usd == Decimal(50), standing
    finally:
        stop.set()
        await task
        await reader.close()


# --- item 9: a lost attempt keeps its reservation -----------------------------------------


async def test_a_lost_attempt_keeps_its_reservation_until_its_result(db_url: str) -> None:
    """A reaped (lost) attempt's reservation stands (bounded: about an hour) until its result
    is recorded, so its re-queued job, which reserves on its own, waits for room; when the
    lost attempt's result arrives the retry runs."""
    await put_budget(
        db_url, "lossy", {"team": "l"}, limit_usd=Decimal(1),
        default_reservation_usd=Decimal("0.6"),
    )  # fmt: skip
    fast = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0, "lease_timeout": 1.0}
    async with running_service(db_url, budget_recheck=0.2, **fast) as service:
        first = RawDaemon(ws_url(service), "d-lost", capacity=1)
        await first.connect()
        [job_id] = await submit(service, [job({"team": "l"})])
        offer = await first.next_of(p.JobOffer, timeout=scaled(10))
        await first.accept(offer)
        await first.send(
            p.JobGeneration(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.GenerationPayload(
                    seq=0, provider="simulated", response_model="sim-small",
                    input_tokens=10, output_tokens=10, cost_usd=0.1,
                ),
            )
        )  # fmt: skip
        await first.next_of(p.JobAck, timeout=scaled(10))
        await first.close()  # partitioned: it stops answering

        async def requeued() -> bool:
            rows = await fetch(db_url, "SELECT status FROM executions WHERE id = $1", offer.id)
            return bool(rows[0]["status"] == "lost")

        await wait_for(requeued, scaled(15))
        [row] = await fetch(
            db_url,
            "SELECT extract(epoch FROM counted_until - now()) AS left FROM executions "
            "WHERE id = $1",
            offer.id,
        )
        assert 3000 < row["left"] <= 3600
        second = RawDaemon(ws_url(service), "d-second", capacity=1)
        await second.connect()

        async def held() -> bool:
            rows = await fetch(db_url, "SELECT hold_reason FROM jobs WHERE id = $1", job_id)
            return rows[0]["hold_reason"] is not None

        await wait_for(held, scaled(10))
        with pytest.raises(TimeoutError):
            await second.next_of(p.JobOffer, timeout=1.0)
        conn = await asyncpg.connect(db_url)
        [standing] = await store.report(conn, datetime.now(UTC))
        await conn.close()
        assert standing.reserved_usd == Decimal("0.5")  # 0.6 less the 0.1 reported
        # The lost attempt's daemon comes back (serving nothing now) and reports: its
        # reservation is released and the retry runs on the other daemon.
        first = RawDaemon(ws_url(service), "d-lost", executors=["nothing"], capacity=1)
        await first.connect()
        await first.send(
            p.JobResult(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.ResultPayload(
                    success=True, input_tokens=10, output_tokens=10, cost_usd=0.1
                ),
            )
        )
        retry = await second.next_of(p.JobOffer, timeout=scaled(15))
        assert retry.payload.job_id == job_id and retry.payload.attempt == 2
        await second.accept(retry)
        await second.finish(retry)
        await first.close()
        await second.close()


# --- item 11: closed hours are summed once ------------------------------------------------


async def test_closed_hours_are_summed_once_and_open_hours_read_live(db_url: str) -> None:
    """With the closed-hours cache, a lifetime budget's spend equals the uncached sum, later
    spend in the open hours is seen at once, and the closed hours are not read again (a row
    written into a closed hour afterwards, which the ledger never does, stays unseen)."""
    await put_budget(db_url, "life", {"team": "c"}, period="lifetime", limit_usd=Decimal(1000))
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

    async def add(hour: datetime, usd: str) -> None:
        await fetch(
            db_url,
            """
            INSERT INTO usage_hourly AS t (hour, model, provider, executor, labels, cost_usd,
                calls, input_tokens)
            VALUES ($1, 'm', 'p', 'simulated', '{"team": "c", "x": "y"}', $2, 1, 100)
            ON CONFLICT (hour, executor, provider, model, labels_key, shard)
            DO UPDATE SET cost_usd = t.cost_usd + excluded.cost_usd
            """,
            hour,
            Decimal(usd),
        )

    for hours_ago in (300, 30, 5):
        await add(now - timedelta(hours=hours_ago), "1.5")
    await add(now, "0.25")
    conn = await asyncpg.connect(db_url)
    try:
        closed = ClosedSpend()
        [cached] = await store.report(conn, datetime.now(UTC), closed)
        [plain] = await store.report(conn, datetime.now(UTC))
        assert cached.spent_usd == plain.spent_usd == Decimal("4.75")
        assert cached.spent_tokens == plain.spent_tokens == 400
        await add(now, "1")
        await add(now - timedelta(hours=40), "7")  # into a closed hour
        [cached] = await store.report(conn, datetime.now(UTC), closed)
        assert cached.spent_usd == Decimal("5.75")
    finally:
        await conn.close()


# --- item 12: rows no budget can enforce --------------------------------------------------


async def test_the_database_refuses_nan_infinity_and_unknown_time_zones(db_url: str) -> None:
    """Migration 0014's CHECKs refuse a NaN or infinite amount and an unknown time zone."""
    for columns in (
        {"limit_usd": Decimal("NaN")},
        {"limit_usd": Decimal("Infinity")},
        {"default_reservation_usd": Decimal("Infinity")},
        {"time_zone": "Mars/Base"},
    ):
        with pytest.raises(asyncpg.CheckViolationError):
            await put_budget(db_url, "bad", {"team": "q"}, **columns)


async def test_a_bad_row_already_present_refuses_only_its_own_jobs(db_url: str) -> None:
    """Budget rows written before 0014 with a NaN limit or an unknown time zone hold their
    own jobs with the reason; other jobs run, and /api/v1/budgets and `tally budgets list`
    answer with the problem instead of failing."""
    conn = await asyncpg.connect(db_url)
    await conn.execute(
        "ALTER TABLE budgets DROP CONSTRAINT budgets_limit_usd_bounded, "
        "DROP CONSTRAINT budgets_time_zone_known"
    )
    await conn.close()
    await put_budget(db_url, "nan", {"team": "n"}, limit_usd=Decimal("NaN"))
    await put_budget(db_url, "mars", {"team": "z"}, time_zone="Mars/Base")
    await put_budget(db_url, "fine", {"team": "ok"}, limit_usd=Decimal(5))
    async with running_service(db_url) as service:
        daemon = RawDaemon(ws_url(service), "d-bad", capacity=2)
        await daemon.connect()
        bad = await submit(service, [job({"team": "n"}), job({"team": "z"})])
        [good] = await submit(service, [job({"team": "ok"})])
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert offer.payload.job_id == good
        await daemon.accept(offer)
        await daemon.finish(offer)
        rows = await fetch(
            db_url, "SELECT id, hold_reason FROM jobs WHERE id = ANY($1::uuid[])", bad
        )
        reasons = sorted(r["hold_reason"] or "" for r in rows)
        assert reasons[0].startswith("budget mars: cannot be enforced: time zone 'Mars/Base'")
        assert reasons[1].startswith("budget nan: cannot be enforced: limit_usd is NaN")
        code, body = await asyncio.to_thread(get_json, http_url(service, "/api/v1/budgets"))
        assert code == 200, body
        by_name = {b["name"]: b for b in body}
        assert by_name["nan"]["limitUsd"] is None and "NaN" in by_name["nan"]["problem"]
        assert "Mars/Base" in by_name["mars"]["problem"] and by_name["fine"]["problem"] is None
        await daemon.close()
    listed = tally(db_url, "budgets", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert {b["name"] for b in json.loads(listed.stdout)} == {"nan", "mars", "fine"}
    for fmt in ("csv", "table"):
        out = tally(db_url, "budgets", "list", "--format", fmt)
        assert out.returncode == 0 and "mars" in out.stdout, out.stderr


# --- item 13: a budget-failed job is counted once, after the commit -----------------------


async def test_a_budget_failed_job_is_counted_once_when_a_claim_rolls_back(db_url: str) -> None:
    """A claim that fails a job by budget and then rolls back (here: the first insert of an
    execution raises) counts nothing; the claim that commits counts it: once."""
    await put_budget(db_url, "none", {"team": "f"}, limit_usd=Decimal(0), action="fail")
    await execute(
        db_url,
        """
        CREATE SEQUENCE fail_once;  -- nextval is not rolled back with the claim
        CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('fail_once') = 1 THEN
                RAISE EXCEPTION 'test: the claim fails once';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_once BEFORE INSERT ON executions
            FOR EACH ROW EXECUTE FUNCTION fail_once();
        """,
    )
    async with running_service(db_url) as service:
        [refused] = await submit(service, [job({"team": "f"}, priority=5)])
        await submit(service, [job({"team": "free"})])
        daemon = RawDaemon(ws_url(service), "d-count", capacity=2)
        await daemon.connect()
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(15))
        await daemon.accept(offer)
        await daemon.finish(offer)
        [row] = await fetch(db_url, "SELECT status, stop_reason FROM jobs WHERE id = $1", refused)
        assert (row["status"], row["stop_reason"]) == ("failed", "budget")
        assert (await fetch(db_url, "SELECT last_value FROM fail_once"))[0]["last_value"] > 1
        assert await jobs_failed_counted(service) == 1
        await daemon.close()


# --- item 17: default maxTurns, DST at midnight, set vs claim ------------------------------


async def test_a_job_without_max_turns_gets_the_servers_default(db_url: str) -> None:
    """`tally serve --default-max-turns` is offered to a job without its own maxTurns (a
    job's own is kept); without it a tool loop would have no cap."""
    async with running_service(db_url, default_max_turns=7) as service:
        daemon = RawDaemon(ws_url(service), "d-turns", capacity=1)
        await daemon.connect()
        await submit(service, [job({})])
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert offer.payload.limits.max_turns == 7
        await daemon.accept(offer)
        await daemon.finish(offer)
        await submit(service, [job({}, limits=p.Limits(max_turns=50))])
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert offer.payload.limits.max_turns == 50
        await daemon.accept(offer)
        await daemon.finish(offer)
        await daemon.close()
    help_text = subprocess.run(
        [sys.executable, "-m", "orchestrator", "serve", "--help"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "--default-max-turns" in help_text and "TALLY_DEFAULT_MAX_TURNS" in help_text


@pytest.mark.parametrize(
    ("zone", "period", "now", "start"),
    [
        # Havana, 1 Nov 2026: clocks go back from 01:00 to 00:00, so midnight happens twice;
        # the day (and the month) begins at the first one, 04:00 UTC, even during the second.
        ("America/Havana", "day", "2026-11-01T05:30:00+00:00", "2026-11-01T04:00:00+00:00"),
        ("America/Havana", "month", "2026-11-01T05:30:00+00:00", "2026-11-01T04:00:00+00:00"),
        # Havana, 8 Mar 2026: midnight does not exist (00:00 -> 01:00): the day begins at
        # 01:00 local, 05:00 UTC.
        ("America/Havana", "day", "2026-03-08T12:00:00+00:00", "2026-03-08T05:00:00+00:00"),
        ("America/Santiago", "day", "2026-09-06T12:00:00+00:00", "2026-09-06T04:00:00+00:00"),
        ("Asia/Beirut", "day", "2026-03-29T12:00:00+00:00", "2026-03-28T22:00:00+00:00"),
    ],
)
def test_a_period_begins_at_the_real_start_of_a_local_day(
    zone: str, period: str, now: str, start: str
) -> None:
    """Where a DST change falls at midnight, a period begins at the first instant of its
    local day: never an hour late (a repeated midnight) or early (a skipped one)."""
    budget = store.Budget(
        name="tz", selector={}, limit_usd=Decimal(1), period=period,  # type: ignore[arg-type]
        action="hold", default_reservation_usd=Decimal("0.1"), time_zone=zone,
    )  # fmt: skip
    begin, reset = budget.window(datetime.fromisoformat(now))
    assert begin == datetime.fromisoformat(start)
    assert reset is not None and begin < datetime.fromisoformat(now) < reset


async def test_budgets_set_and_claims_never_deadlock(db_url: str) -> None:
    """`budgets set` (the CLI's upsert) run 500 times while claims decide the jobs that
    budget holds, their holds coming due all the time (rechecks of 1 to 30 ms): no deadlock
    is ever detected (the old order, budget row then jobs, deadlocked several times a run)."""
    await put_budget(db_url, "race", {"team": "r"}, limit_usd=Decimal(0))
    pool = await create_pool(db_url, min_size=2, max_size=8)
    stores = [JobStore(pool, hold_recheck=r) for r in (0.001, 0.002, 0.004, 0.008, 0.016, 0.03)]
    await stores[0].submit([job({"team": "r"}) for _ in range(40)])
    budget = store.Budget(
        name="race", selector={"team": "r"}, limit_usd=Decimal(0), period="day",
        action="hold", default_reservation_usd=Decimal("0.1"),
    )  # fmt: skip
    stop = asyncio.Event()
    errors: list[BaseException] = []

    async def claims(jobs: JobStore) -> None:
        while not stop.is_set():
            try:
                await jobs.claim({"simulated": [("d1", {"simulated": frozenset()})]}, 30.0, 2)
            except asyncpg.DeadlockDetectedError as exc:
                errors.append(exc)

    tasks = [asyncio.create_task(claims(s)) for s in stores]
    try:
        conn = await asyncpg.connect(db_url)
        try:
            for _ in range(500):
                try:
                    await store.upsert(conn, budget)
                except asyncpg.DeadlockDetectedError as exc:
                    errors.append(exc)
        finally:
            await conn.close()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await pool.close()
    assert errors == []
    rows = await fetch(db_url, "SELECT count(*) AS n FROM jobs WHERE hold_reason IS NOT NULL")
    assert rows[0]["n"] == 40  # the claims did decide (hold) them throughout


async def test_migration_0014_applies_over_rows_it_would_refuse(empty_db_url: str) -> None:
    """A database at 0013 holding a NaN limit, an infinite default reservation and a bad time
    zone migrates to 0014: the rows stay (to be refused one by one at the claim), new ones
    are checked."""
    conn = await asyncpg.connect(empty_db_url)
    try:
        await migrate.up(conn, migrate.discover(), to=13)
        await conn.execute(
            """
            INSERT INTO budgets (name, selector, limit_usd, period, time_zone, action,
                                 default_reservation_usd)
            VALUES ('nan', '{}', 'NaN', 'day', 'UTC', 'hold', 0.1),
                   ('inf', '{}', 1, 'day', 'UTC', 'hold', 'Infinity'),
                   ('mars', '{}', 1, 'day', 'Mars/Base', 'hold', 0.1)
            """
        )
        await migrate.up(conn, migrate.discover(), to=14)
        assert await conn.fetchval("SELECT count(*) FROM budgets") == 3
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE budgets SET limit_usd = 'NaN' WHERE name = 'inf'")
        names = [b.name for b in await store.load(conn) if b.problem is not None]
        assert names == ["inf", "mars", "nan"]
    finally:
        await conn.close()


# --- review of 1c01964 ----------------------------------------------------------------------


class ModelDaemon(RawDaemon):
    """A raw daemon whose simulated executor is restricted to some models."""

    def __init__(self, url: str, daemon_id: str, models: list[str], capacity: int = 1) -> None:
        super().__init__(url, daemon_id, capacity=capacity)
        self.models = models

    async def connect(self, inflight: list[tuple[str, str]] | None = None) -> p.DaemonRegistered:
        self.ws = await connect(
            self.url, additional_headers={"Authorization": f"Bearer {self.token}"}
        )
        payload = p.RegisterPayload(
            daemon_id=self.daemon_id, hostname="t", version="0",
            protocol_version=p.PROTOCOL_VERSION,
            executors=[p.ExecutorInfo(name="simulated", models=self.models)],
            max_concurrent_jobs=self.capacity,
        )  # fmt: skip
        await self.ws.send(p.encode(p.make(p.DaemonRegister, payload)).decode())
        frame = await self.recv()
        assert isinstance(frame, p.DaemonRegistered), frame
        return frame


async def test_jobs_no_free_slot_serves_never_spin_the_claim_or_starve_the_queue(
    db_url: str,
) -> None:
    """1001 queued priority-5 jobs for model m1, which the only daemon (restricted to m2, one
    slot) cannot run, do not hide the priority-0 m2 job behind them: it is offered within
    10 s, and the dispatcher does not spin claims meanwhile (old: MAX_EXAMINED unservable rows
    re-read forever, the m2 job never offered)."""
    await fetch(
        db_url,
        "INSERT INTO jobs (id, executor, model, priority) "
        "SELECT gen_random_uuid(), 'simulated', 'm1', 5 FROM generate_series(1, 1001)",
    )
    async with running_service(db_url) as service:
        assert service.parts is not None
        jobs = service.parts.dispatcher.jobs
        claims = 0
        real_claim = jobs.claim

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal claims
            claims += 1
            return await real_claim(*args, **kwargs)

        jobs.claim = counted  # type: ignore[method-assign]
        [wanted] = await submit(service, [job({}, model="m2")])
        daemon = ModelDaemon(ws_url(service), "d-m2", ["m2"])
        await daemon.connect()
        offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert offer.payload.job_id == wanted
        await daemon.accept(offer)
        await daemon.finish(offer)
        before = claims
        await daemon.pong_for(5.0)
        assert claims - before < 100, claims - before
        await daemon.close()
        await fetch(db_url, "DELETE FROM jobs WHERE model = 'm1'")


async def test_an_offer_that_timed_out_keeps_its_reservation_until_its_result(
    db_url: str,
) -> None:
    """An offer whose job:accept never arrived (lost in a link reset: the daemon may be
    running it) keeps its budget reservation after the offer times out, so the retry waits
    for room; when the cut-off attempt's result arrives the retry runs (old: released at
    once, the retry reserved again while the first attempt spent)."""
    await put_budget(
        db_url, "offers", {"team": "o"}, limit_usd=Decimal(1),
        default_reservation_usd=Decimal("0.6"),
    )  # fmt: skip
    async with running_service(db_url, budget_recheck=0.2, offer_timeout=1.0) as service:
        first = RawDaemon(ws_url(service), "d-silent", capacity=1)
        await first.connect()
        [job_id] = await submit(service, [job({"team": "o"})])
        offer = await first.next_of(p.JobOffer, timeout=scaled(10))
        await first.close()  # its accept is lost with the link

        async def expired() -> bool:
            rows = await fetch(db_url, "SELECT status FROM executions WHERE id = $1", offer.id)
            return bool(rows[0]["status"] == "rejected")

        await wait_for(expired, scaled(15))
        second = RawDaemon(ws_url(service), "d-other", capacity=1)
        await second.connect()
        with pytest.raises(TimeoutError):
            await second.next_of(p.JobOffer, timeout=2.0)
        conn = await asyncpg.connect(db_url)
        [standing] = await store.report(conn, datetime.now(UTC))
        await conn.close()
        assert standing.reserved_usd == Decimal("0.6")
        first = RawDaemon(ws_url(service), "d-silent", executors=["nothing"], capacity=1)
        await first.connect()
        await first.send(
            p.JobResult(
                id=offer.id,
                timestamp=p.now_ms(),
                payload=p.ResultPayload(success=True, input_tokens=5, output_tokens=5),
            )
        )
        retry = await second.next_of(p.JobOffer, timeout=scaled(15))
        assert retry.payload.job_id == job_id and retry.payload.attempt == 2
        await second.accept(retry)
        await second.finish(retry)
        await first.close()
        await second.close()


async def test_budgets_delete_and_the_settled_sweep_never_deadlock(db_url: str) -> None:
    """`budgets delete` (cascading into its reservations in key order) run against the
    snapshot's sweep of settled reservations, 40 times over 300 reservations each: no
    deadlock (the sweep locks in key order and skips what it cannot take)."""
    await fetch(
        db_url,
        "INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status) "
        "VALUES ('d12', 'h', 'v', 1, 'connected')",
    )
    await fetch(
        db_url,
        """
        WITH j AS (
            INSERT INTO jobs (id, executor, status, attempts)
            SELECT gen_random_uuid(), 'simulated', 'succeeded', 1 FROM generate_series(1, 300)
            RETURNING id
        )
        INSERT INTO executions (id, job_id, attempt, daemon_id, status, result_recorded_at)
        SELECT gen_random_uuid(), id, 1, 'd12', 'succeeded', now() FROM j
        """,
    )
    errors: list[BaseException] = []
    a, b = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    try:
        for _ in range(40):
            for name in ("x1", "x2"):
                await put_budget(db_url, name, {"team": name})
                await a.execute(
                    "INSERT INTO budget_reservations (budget, execution_id, amount_usd) "
                    "SELECT $1, id, 0.1 FROM executions",
                    name,
                )
            results = await asyncio.gather(
                store.delete(a, "x1"), b.execute(store.DROP_SETTLED), return_exceptions=True
            )
            errors += [r for r in results if isinstance(r, BaseException)]
            await store.delete(a, "x2")
    finally:
        await a.close()
        await b.close()
    assert errors == []


def test_budgets_set_refuses_a_zone_the_database_lacks_in_one_line(db_url: str) -> None:
    """A zone this host knows but the database's tz data lacks (here: a database that knows
    only UTC) makes `budgets set` exit 2 with a one-line message naming --time-zone, not a
    CheckViolationError traceback."""
    asyncio.run(
        execute(
            db_url,
            """
            CREATE OR REPLACE FUNCTION tally_is_time_zone(name text) RETURNS boolean
            LANGUAGE sql IMMUTABLE AS $$ SELECT name = 'UTC' $$;
            """,
        )
    )
    out = tally(
        db_url, "budgets", "set", "z", "--selector", "t=z", "--limit-usd", "1",
        "--time-zone", "Europe/Paris",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "--time-zone 'Europe/Paris'" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


async def test_a_slow_first_sum_of_closed_hours_stops_no_claim_nor_readiness(
    db_url: str,
) -> None:
    """While the first sum of a lifetime budget's closed hours cannot finish (the rollups
    locked), an unbudgeted job is offered, /readyz stays 200, and the budget's job waits
    with "figures loading"; once the sum is done that job runs (old: the sum ran inside
    every claim, and the snapshot, under their deadlines: nothing claimed, readyz 503)."""
    await put_budget(db_url, "life", {"team": "w"}, period="lifetime", limit_usd=Decimal(100))
    old = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=300)
    await fetch(
        db_url,
        "INSERT INTO usage_hourly (hour, model, provider, executor, labels, cost_usd, calls) "
        "VALUES ($1, 'm', 'p', 'simulated', '{\"team\": \"w\"}', 1.5, 1)",
        old,
    )
    # The seeded past spend is a rollup row with no call behind it: the ledger invariants
    # (every rollup equals its detail) cannot hold for it, so they are not checked here.
    async with running_service(
        db_url, check_invariants=False, budget_recheck=0.3, snapshot_interval=0.2
    ) as service:
        daemon = RawDaemon(ws_url(service), "d-warm", capacity=2)
        await daemon.connect()
        locker = await asyncpg.connect(db_url)
        tr = locker.transaction()
        await tr.start()
        await locker.execute("LOCK TABLE usage_hourly IN ACCESS EXCLUSIVE MODE")
        try:
            assert service.parts is not None
            service.parts.dispatcher.jobs.closed_spend._entries.clear()  # as after a restart
            [budgeted] = await submit(service, [job({"team": "w"}, priority=5)])
            [free] = await submit(service, [job({"team": "none"})])
            offer = await daemon.next_of(p.JobOffer, timeout=scaled(10))
            assert offer.payload.job_id == free
            await daemon.accept(offer)
            [row] = await fetch(db_url, "SELECT hold_reason FROM jobs WHERE id = $1", budgeted)
            assert "figures loading" in (row["hold_reason"] or ""), row
            await daemon.pong_for(6.0)  # past the snapshot's 5 s deadline

            def ready() -> int:
                with urllib.request.urlopen(http_url(service, "/readyz"), timeout=10) as r:
                    return int(r.status)

            assert await asyncio.to_thread(ready) == 200
        finally:
            await tr.rollback()
            await locker.close()
        await daemon.finish(offer)
        second = await daemon.next_of(p.JobOffer, timeout=scaled(10))
        assert second.payload.job_id == budgeted
        await daemon.accept(second)
        await daemon.finish(second)
        await daemon.close()


# --- second review, finding 1: an attempt its daemon does not list stops counting ----------


async def test_a_daemon_that_restarts_without_an_offer_frees_its_job_and_budget(
    db_url: str,
) -> None:
    """An offer a daemon never took (it closed without reading it; the offer timed out) is
    held counted only until that daemon registers again without listing it: the job, with
    maxTurns and a budget reservation that leaves no room for a second, runs again within
    seconds and the budget is free (old: both held for LOST_RESERVATION_HOLD, an hour)."""
    await put_budget(
        db_url, "restart", {"team": "r"}, limit_usd=Decimal(1),
        default_reservation_usd=Decimal("0.6"),
    )  # fmt: skip
    async with running_service(db_url, budget_recheck=0.2, offer_timeout=1.0) as service:
        first = RawDaemon(ws_url(service), "d-restarts", capacity=1)
        await first.connect()
        [job_id] = await submit(service, [job({"team": "r"}, limits=p.Limits(max_turns=5))])
        offer = await first.next_of(p.JobOffer, timeout=scaled(10))
        await first.close()  # restarts: it never started the job

        async def expired() -> bool:
            rows = await fetch(db_url, "SELECT status FROM executions WHERE id = $1", offer.id)
            return bool(rows[0]["status"] == "rejected")

        await wait_for(expired, scaled(15))
        again = RawDaemon(ws_url(service), "d-restarts", capacity=1)
        await again.connect()  # lists nothing in flight
        retry = await again.next_of(p.JobOffer, timeout=scaled(15))
        assert retry.payload.job_id == job_id and retry.payload.attempt == 2
        assert retry.payload.limits.max_turns == 5
        conn = await asyncpg.connect(db_url)
        [standing] = await store.report(conn, datetime.now(UTC))
        await conn.close()
        assert standing.reserved_usd == Decimal("0.6")  # the retry's own, not two
        await again.accept(retry)
        await again.finish(retry)
        await again.close()


# --- second review, finding 5: the usage API reads the process's closed-hours sums ---------


async def test_the_budgets_api_reads_the_warm_closed_hours_never_summing_them(
    db_url: str,
) -> None:
    """/api/v1/budgets answers from the service's shared closed-hours sums once warm: a row
    written afterwards into a closed hour (which the ledger never does) stays unseen, so no
    request sums the closed hours again (old: every request summed a lifetime budget's hours
    from 1970 with a throwaway cache, and saw the row)."""
    await put_budget(db_url, "api-life", {"team": "a"}, period="lifetime", limit_usd=Decimal(99))
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    insert = """
        INSERT INTO usage_hourly AS t (hour, model, provider, executor, labels, cost_usd, calls)
        VALUES ($1, 'm', 'p', 'simulated', '{"team": "a"}', $2, 1)
        ON CONFLICT (hour, executor, provider, model, labels_key, shard)
        DO UPDATE SET cost_usd = t.cost_usd + excluded.cost_usd
    """
    for hours_ago in range(5, 500, 7):
        await fetch(db_url, insert, now - timedelta(hours=hours_ago), Decimal(1))
    async with running_service(db_url) as service:
        url = http_url(service, "/api/v1/budgets")

        async def warm() -> bool:
            code, body = await asyncio.to_thread(get_json, url)
            return code == 200 and not body[0]["loading"] and body[0]["spentUsd"] == 71.0

        await wait_for(warm, scaled(20))
        await fetch(db_url, insert, now - timedelta(hours=40), Decimal(1000))
        for _ in range(3):
            code, body = await asyncio.to_thread(get_json, url)
            assert code == 200 and body[0]["spentUsd"] == 71.0, body
        # rows written by hand, with no calls behind them: not for the ledger's invariants
        await fetch(db_url, 'DELETE FROM usage_hourly WHERE labels @> \'{"team": "a"}\'')


async def test_a_full_closed_hours_cache_evicts_past_periods_not_current_ones(
    db_url: str,
) -> None:
    """Past the cache's bound, the keys of past periods are evicted and the keys asked for
    (every budget's current period) stay warm: no budget falls back to "figures loading"."""
    from orchestrator.store import spend

    cache = spend.ClosedSpend()
    past = datetime(2020, 1, 1, tzinfo=UTC)
    for i in range(spend.MAX_ENTRIES + 1):
        cache._entries[(f'{{"old": "{i}"}}', past)] = spend._Closed(past, spend.Spent())
    current = ('{"team": "a"}', datetime(2026, 1, 1, tzinfo=UTC))
    marker = spend.Spent(usd=Decimal("1.5"))
    conn = await asyncpg.connect(db_url)
    try:
        cutoff = await conn.fetchval(spend.CUTOFF, spend.CLOSED_MARGIN.total_seconds())
        cache._entries[current] = spend._Closed(cutoff, marker)
        await cache.advance(conn, [current])
    finally:
        await conn.close()
    assert list(cache._entries) == [current]
    assert cache._entries[current].spent is marker

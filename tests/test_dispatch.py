"""Dispatch on a real PostgreSQL: a claim never gives a daemon more jobs than its free slots,
whatever its number of executors."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from orchestrator.store import JobStore
from orchestrator.store.db import create_pool
from shared import protocol as p

EXECUTORS = ("simulated", "anthropic", "openai")


def _slots(
    free: dict[str, int],
) -> dict[str, list[tuple[str, dict[str, frozenset[str]]]]]:
    """Free slots as the dispatcher lists them: each daemon's free slots under each executor."""
    offers = {name: frozenset[str]() for name in EXECUTORS}
    slots: dict[str, list[tuple[str, dict[str, frozenset[str]]]]] = {n: [] for n in EXECUTORS}
    for r in range(max(free.values())):
        for daemon_id, n in free.items():
            if r < n:
                for name in EXECUTORS:
                    slots[name].append((daemon_id, offers))
    return slots


async def test_a_daemon_with_several_executors_is_offered_at_most_its_free_slots(
    db_url: str,
) -> None:
    """3 daemons x 4 slots x 3 executors, 300 queued jobs of the three executors: each claim
    gives every daemon at most its free slots, and every job is claimed exactly once."""
    conn = await asyncpg.connect(db_url)
    await conn.execute(
        "INSERT INTO daemons (id, hostname, version, max_concurrent_jobs, status)"
        " SELECT 'd' || i, 'h', 'v', 4, 'connected' FROM generate_series(1, 3) i"
    )
    await conn.close()
    pool = await create_pool(db_url, min_size=1, max_size=2)
    store = JobStore(pool)
    try:
        await store.submit(
            [p.JobSpec(executor=EXECUTORS[i % 3], spec={"turns": 1}) for i in range(300)]
        )
        seen: set[str] = set()
        for _ in range(25):
            free = {"d1": 4, "d2": 4, "d3": 4}
            claimed = await store.claim(_slots(free), 30.0, sum(free.values()))
            per_daemon: dict[str, int] = {}
            for job in claimed:
                per_daemon[job.daemon_id] = per_daemon.get(job.daemon_id, 0) + 1
                assert job.job_id not in seen, "a job offered twice"
                seen.add(job.job_id)
            assert all(n <= free[d] for d, n in per_daemon.items()), per_daemon
            assert len(claimed) == 12
        assert len(seen) == 300
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT count(*) FROM executions") == 300
            assert await c.fetchval("SELECT count(DISTINCT job_id) FROM executions") == 300
    finally:
        await pool.close()


async def test_a_claim_waits_for_an_exhausted_pool_no_longer_than_its_deadline(
    db_url: str,
) -> None:
    """With every connection of the pool held by others (the ledger under load), a claim
    gives up after its deadline (TimeoutError, the dispatcher retries) instead of waiting
    without bound."""
    pool = await create_pool(db_url, min_size=1, max_size=1)
    store = JobStore(pool)
    try:
        await store.submit([p.JobSpec(executor="simulated", spec={"turns": 1})])
        async with pool.acquire():
            started = time.monotonic()
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await asyncio.wait_for(
                    store.claim(_slots({"d1": 1}), 30.0, 1, deadline=0.5), timeout=20
                )
            assert time.monotonic() - started < 10
    finally:
        await pool.close()

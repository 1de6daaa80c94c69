"""End to end: real `tally serve` in process, real `tallyd` processes, real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from orchestrator.client import TallyClient
from shared import protocol as p
from tests.conftest import scaled
from tests.stack import (
    CLIENT_TOKEN,
    fetch,
    http_url,
    running_service,
    start_daemon,
    stop_daemon_async,
    submit_early,
    ws_url,
)
from tests.test_ingest import assert_counters_equal_ledger


async def test_simulated_jobs_across_three_daemons(db_url: str, tmp_path: Path) -> None:
    """200 simulated jobs on 3 daemons x 4 slots all succeed; job totals equal their calls."""
    async with running_service(db_url) as service:
        daemons = [start_daemon(ws_url(service), tmp_path / f"d{i}") for i in range(3)]
        try:
            async with TallyClient(ws_url(service), CLIENT_TOKEN) as client:
                specs = [
                    p.JobSpec(
                        executor="simulated",
                        model=["sim-small", "sim-large"][i % 2],
                        spec={
                            "prompt": f"job {i}",
                            "turns": 1 + i % 3,
                            "cachePrefixTokens": 1000 if i % 2 else 0,
                        },
                    )
                    for i in range(200)
                ]
                ids = await submit_early(client, specs)
                finals = await client.wait(ids, timeout=scaled(120))
            await assert_counters_equal_ledger(db_url, http_url(service, "/metrics"))
        finally:
            codes = [await stop_daemon_async(d) for d in daemons]
    assert codes == [0, 0, 0]
    assert {f.status for f in finals.values()} == {"succeeded"}
    mismatched = await fetch(
        db_url,
        """
        SELECT j.id, j.cost_usd, s.cost, j.num_turns, s.n, j.input_tokens, s.i FROM jobs j
        LEFT JOIN (SELECT e.job_id, sum(c.input_tokens) i, sum(c.output_tokens) o,
                          sum(c.cache_read_input_tokens) cr, sum(c.cache_creation_input_tokens) cc,
                          sum(c.cost_usd) cost, count(*) n
                   FROM llm_calls c JOIN executions e ON e.id = c.execution_id
                   GROUP BY e.job_id) s ON s.job_id = j.id
        WHERE j.input_tokens IS DISTINCT FROM s.i OR j.output_tokens IS DISTINCT FROM s.o
           OR j.cache_read_input_tokens IS DISTINCT FROM s.cr
           OR j.cache_creation_input_tokens IS DISTINCT FROM s.cc
           OR j.cost_usd IS DISTINCT FROM s.cost OR j.num_turns IS DISTINCT FROM s.n
    """,
    )
    assert [dict(r) for r in mismatched] == []
    per_model = await fetch(
        db_url,
        """
        SELECT count(*) AS n FROM execution_model_usage m
        JOIN (SELECT execution_id, response_model, sum(input_tokens) i, sum(output_tokens) o
              FROM llm_calls GROUP BY 1, 2) c
          ON c.execution_id = m.execution_id AND c.response_model = m.model
        WHERE m.input_tokens <> c.i OR m.output_tokens <> c.o
    """,
    )
    assert per_model[0]["n"] == 0
    counts = await fetch(db_url, "SELECT count(*) AS n FROM execution_model_usage")
    assert counts[0]["n"] == 200

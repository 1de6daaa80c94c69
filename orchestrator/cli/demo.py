"""The ``tally up --demo`` batch: several models, cache-friendly and hostile prompts, a failure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.cli.render import render_usage
from orchestrator.client import TallyClient
from orchestrator.store import reports
from orchestrator.store.db import connection
from shared import protocol as p
from shared.errors import TallyError

TERMINAL = p.TERMINAL_JOB_STATES


def demo_jobs(run_id: str) -> list[p.JobSpec]:
    """A mixed batch of simulated jobs, labelled with the demo run."""
    jobs: list[p.JobSpec] = []
    labels = {"workflow": "demo", "run": run_id}
    for i in range(24):  # cache-friendly: a long shared prefix read back on every later turn
        jobs.append(
            p.JobSpec(
                executor="simulated",
                model=["sim-small", "sim-large"][i % 2],
                spec={
                    "prompt": f"review diff {i}",
                    "turns": 3 + i % 3,
                    "cachePrefixTokens": 4000,
                    "latencyMs": 60,
                    "tools": ["current_time"],  # answered between its calls
                },
                labels={**labels, "tenant": "acme", "kind": "cache-friendly"},
            )
        )
    for i in range(12):  # cache-hostile: nothing reusable
        jobs.append(
            p.JobSpec(
                executor="simulated",
                model="sim-small",
                spec={"prompt": f"summarise ticket {i}", "turns": 2, "latencyMs": 40},
                labels={**labels, "tenant": "globex", "kind": "cache-hostile"},
            )
        )
    for i in range(6):  # a reasoning model
        jobs.append(
            p.JobSpec(
                executor="simulated",
                model="sim-reasoner",
                spec={
                    "prompt": f"plan {i}",
                    "turns": 2,
                    "reasoningTokens": 150,
                    "outputTokens": 300,
                    "latencyMs": 80,
                },
                labels={**labels, "tenant": "acme", "kind": "reasoning"},
            )
        )
    jobs.append(
        p.JobSpec(
            executor="simulated",
            model="sim-large",
            max_attempts=1,
            spec={"prompt": "this one fails", "turns": 2, "fail": True, "latencyMs": 40},
            labels={**labels, "tenant": "globex", "kind": "failing"},
        )
    )
    jobs.append(
        p.JobSpec(
            executor="simulated",
            model="sim-large",
            spec={
                "prompt": "long agent loop",
                "turns": 40,
                "cachePrefixTokens": 8000,
                "latencyMs": 30,
            },
            limits=p.Limits(budget_usd=0.08),
            labels={**labels, "tenant": "acme", "kind": "budget-limited"},
        )
    )
    return jobs


async def run_demo(url: str, token: str, dsn: str, console: Console) -> None:
    """Submit the batch, show progress with tokens so far, then print the usage report."""
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    started = datetime.now(UTC) - timedelta(seconds=1)
    jobs = demo_jobs(run_id)
    finals: dict[str, p.UpdatePayload] = {}
    tokens = 0
    async with TallyClient(url, token) as client:
        # The demo's daemons are starting beside it: their executors may not be registered yet.
        ids = await client.submit(jobs, allow_unknown_executor=True)
        columns = (
            TextColumn("[bold]demo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("jobs  {task.fields[tokens]:,} tokens"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("demo", total=len(ids), tokens=0)
            await client.watch(ids)
            async for update in client.updates():
                if update.status in TERMINAL and update.job_id not in finals:
                    finals[update.job_id] = update
                    if isinstance(update.totals, p.JobTotals):
                        t = update.totals
                        tokens += sum(
                            v
                            for v in (
                                t.input_tokens,
                                t.output_tokens,
                                t.cache_read_input_tokens,
                                t.cache_creation_input_tokens,
                            )
                            if isinstance(v, int)
                        )
                    progress.update(task, completed=len(finals), tokens=tokens)
                    if len(finals) == len(ids):
                        break
    outcomes: dict[str, int] = {}
    for final in finals.values():
        outcomes[final.status] = outcomes.get(final.status, 0) + 1
    console.print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    # This run's jobs only, by their label: reports cover whole hours.
    query = reports.UsageQuery(("model",), started, labels={"run": run_id})
    async with connection(dsn) as conn:
        rows = await reports.usage(conn, query)
        tools = await conn.fetchrow(
            """
            SELECT count(*) AS n, count(*) FILTER (WHERE t.error) AS errors,
                   coalesce(sum(t.duration_ms), 0) AS ms
            FROM tool_calls t JOIN executions e ON e.id = t.execution_id
            WHERE e.job_id = ANY($1::uuid[])
            """,
            ids,
        )
    render_usage(rows, query.by, "table", Console(width=160))
    console.print(
        f"tool calls: {tools['n']:,} ({tools['errors']} failed), {tools['ms']:.0f} ms in tools; "
        f"answers: tally jobs show {ids[0][:8]}"
    )
    if outcomes.get("succeeded", 0) < len(ids) - 1:
        raise TallyError(f"demo: unexpected outcomes {outcomes}")

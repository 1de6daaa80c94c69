"""``tally ledger check`` and ``tally prune``: the rollups proven against the detail, and
retention of the detail."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from orchestrator.cli.common import with_db
from orchestrator.local.embedded import resolve_database
from orchestrator.store import ledger_check, retention
from orchestrator.store.db import connection
from orchestrator.store.reports import parse_time
from shared.errors import ConfigError, StoreError
from shared.settings import command_option


@click.group()
def ledger() -> None:
    """Checks of the ledger's own consistency."""


@ledger.command("check")
@with_db
@command_option("ledger")(
    "--since",
    default=None,
    help="Check from this time (24h, 7d, ISO); default: where the detail begins.",
)
def ledger_check_command(
    database_url: str | None, data_dir: Path | None, since: str | None
) -> None:
    """Prove the hourly rollups equal the detail rows they summarise (exit 1 if not)."""
    start = None if since is None else parse_time(since)

    async def run(dsn: str) -> tuple[object, list[ledger_check.Mismatch], int]:
        async with connection(dsn) as conn:
            used, found = await ledger_check.check(conn, start)
            rows = await conn.fetchval(
                "SELECT count(*) FROM usage_hourly"
                " WHERE hour >= date_trunc('hour', coalesce($1::timestamptz, '-infinity'), 'UTC')",
                used,
            )
            return used, found, int(rows)

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        used, found, rows = asyncio.run(run(dsn))
    where = "the start of the ledger" if used is None else str(used)
    if found:
        for m in found:
            click.echo(m.describe(), err=True)
        raise StoreError(
            f"{len(found)}{'+' if len(found) >= ledger_check.MISMATCH_LIMIT else ''} rollup rows"
            f" differ from the detail"
            f" (from {where})"
        )
    click.echo(f"rollups equal the detail: {rows:,} hourly rows from {where}")


prune_option = command_option("prune")


@click.command()
@with_db
@prune_option(
    "--calls-before",
    default=None,
    help="Delete settled calls recorded before this date (ISO, or a duration like 90d).",
)
@prune_option(
    "--executions-before",
    default=None,
    help="Delete the executions, calls and per-model rows of jobs finished before this date.",
)
@prune_option(
    "--batch",
    type=click.IntRange(min=1, max=100_000),
    default=5000,
    show_default=True,
    help="Rows per transaction (jobs: a tenth of it).",
)
def prune(
    database_url: str | None,
    data_dir: Path | None,
    calls_before: str | None,
    executions_before: str | None,
    batch: int,
) -> None:
    """Remove old detail in bounded batches; rollups and job totals remain."""
    if calls_before is None and executions_before is None:
        raise ConfigError("prune: give --calls-before and/or --executions-before")
    calls_cut = None if calls_before is None else parse_time(calls_before, "--calls-before")
    jobs_cut = (
        None if executions_before is None else parse_time(executions_before, "--executions-before")
    )

    async def run(dsn: str) -> list[retention.Pruned]:
        out = []
        async with connection(dsn) as conn:
            if jobs_cut is not None:
                out.append(await retention.prune_jobs(conn, jobs_cut, max(1, batch // 10)))
            if calls_cut is not None:
                out.append(await retention.prune_calls(conn, calls_cut, batch))
        return out

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        results = asyncio.run(run(dsn))
    if jobs_cut is not None:
        done = results[0]
        click.echo(f"pruned the detail of {done.jobs:,} jobs finished before {done.cut}")
    if calls_cut is not None:
        done = results[-1]
        click.echo(
            f"pruned {done.calls:,} calls and {done.tools:,} tool calls recorded before {done.cut}"
        )

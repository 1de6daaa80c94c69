"""``tally usage``: tokens by bucket, cache hit ratio, calls and cost, grouped, from the rollups."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from rich.console import Console

from orchestrator.cli.common import with_db
from orchestrator.cli.render import render_usage
from orchestrator.local.embedded import resolve_database
from orchestrator.store import reports
from orchestrator.store.db import connection
from shared.settings import command_option

usage_option = command_option("usage")


@click.command()
@with_db
@usage_option(
    "--by",
    "group_by",
    default="model",
    show_default=True,
    help="Group by model, provider, executor, hour, day, week or label:KEY; several joined "
    "by commas (model,label:team).",
)
@usage_option(
    "--since",
    default="30d",
    show_default=True,
    help="Start: 24h, 7d, or an ISO date/time (UTC); rounded down to its hour.",
)
@usage_option(
    "--until", default=None, help="End (hours that begin before it): 24h, 7d, or an ISO date."
)
@usage_option("--label", "labels", multiple=True, help="KEY=VALUE; repeat to require several.")
@usage_option("--model", default=None, help="Only this model.")
@usage_option("--executor", default=None, help="Only this executor.")
@usage_option("--provider", default=None, help="Only this provider.")
@usage_option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format.",
)
def usage(
    database_url: str | None,
    data_dir: Path | None,
    group_by: str,
    since: str,
    until: str | None,
    labels: tuple[str, ...],
    model: str | None,
    executor: str | None,
    provider: str | None,
    fmt: str,
) -> None:
    """Tokens by bucket, cache hit ratio, calls and cost, grouped (from the hourly rollups)."""
    query = reports.build_query(group_by, since, until, labels, model, executor, provider)

    async def run(dsn: str) -> list[reports.UsageRow]:
        async with connection(dsn) as conn:
            return await reports.usage(conn, query)

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        rows = asyncio.run(run(dsn))
    render_usage(rows, query.by, fmt, Console(width=200 if fmt == "table" else None))

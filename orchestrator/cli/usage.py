"""``tally usage``: tokens by bucket, cache hit ratio, calls and cost, grouped."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from rich.console import Console

from orchestrator.cli.common import with_db
from orchestrator.cli.render import render_usage
from orchestrator.local.embedded import resolve_database
from orchestrator.store import reports
from orchestrator.store.db import connection
from shared.errors import ConfigError
from shared.settings import command_option

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str) -> datetime:
    """``30m``, ``24h``, ``7d`` or an ISO date/time -> an aware datetime."""
    match = _DURATION.match(value)
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--since {value!r}: expected a duration like 24h or 7d, or an ISO date"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


usage_option = command_option("usage")


@click.command()
@with_db
@usage_option(
    "--by",
    "group_by",
    default="model",
    show_default=True,
    help="Group by model, provider, executor, day or label:KEY.",
)
@usage_option("--since", default="30d", show_default=True, help="Window: 24h, 7d, or an ISO date.")
@usage_option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format.",
)
def usage(
    database_url: str | None, data_dir: Path | None, group_by: str, since: str, fmt: str
) -> None:
    """Tokens by bucket, cache hit ratio, calls and cost, grouped."""
    since_at = parse_since(since)
    reports.group_expression(group_by)

    async def run(dsn: str) -> list[reports.UsageRow]:
        async with connection(dsn) as conn:
            return await reports.usage(conn, group_by, since_at)

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        rows = asyncio.run(run(dsn))
    render_usage(rows, group_by, fmt, Console(width=200 if fmt == "table" else None))

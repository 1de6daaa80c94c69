"""``tally budgets set|list|delete``: spend limits per label selector over a period."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

import asyncpg
import click
from rich.console import Console
from rich.table import Table

from orchestrator.cli.common import with_db
from orchestrator.cli.jobs import print_records
from orchestrator.local.embedded import resolve_database
from orchestrator.store import budgets as store
from orchestrator.store.db import connection
from shared.errors import ConfigError
from shared.limits import MAX_COUNTER, MAX_MONEY
from shared.settings import command_option, parse_labels

option = command_option("budgets")
# The wire's largest amount (an offer's budgetUsd): a reservation never exceeds it.
USD_MAX = Decimal(str(MAX_MONEY))


def _decimal(flag: str, text: str, minimum: Decimal, maximum: Decimal) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ConfigError(f"{flag} {text!r}: not a number") from None
    if not value.is_finite() or not minimum <= value <= maximum:  # NaN and inf refused
        raise ConfigError(f"{flag} {text!r}: expected {minimum} to {maximum}")
    return value


def selector_of(values: tuple[str, ...]) -> dict[str, str]:
    """``--selector team=a`` (repeat to AND labels), or ``*`` for every job."""
    if values == ("*",):
        return {}
    if not values or "*" in values:
        raise ConfigError("--selector: give KEY=VALUE (repeat to AND labels), or '*' alone")
    return parse_labels(values)


@click.group()
def budgets() -> None:
    """Spend limits per label selector over a period, enforced at dispatch."""


@budgets.command("set")
@click.argument("name")
@option("--selector", multiple=True, required=True, help="KEY=VALUE (repeat to AND), or '*'.")
@option("--limit-usd", required=True, help="The limit in USD for each period.")
@option(
    "--limit-tokens",
    type=click.IntRange(min=0, max=MAX_COUNTER),
    help="A token limit as well (optional; at most 2^53-1, the wire's largest counter).",
)
@option(
    "--period",
    type=click.Choice(store.PERIODS),
    default="day",
    show_default=True,
    help="When spend starts again from 0 (lifetime: never).",
)
@option("--time-zone", default="UTC", show_default=True, help="IANA zone of the period's bounds.")
@option(
    "--action",
    type=click.Choice(["hold", "fail"]),
    default="hold",
    show_default=True,
    help="At the limit: hold jobs queued, or fail them (stopReason budget).",
)
@option("--soft", default="0.8", show_default=True, help="Alert threshold, a fraction of it.")
@option(
    "--default-reservation-usd",
    default="0.10",
    show_default=True,
    help="Reserved (and the per-job cap) for a job without its own budgetUsd.",
)
@option(
    "--default-reservation-tokens",
    type=click.IntRange(min=1, max=MAX_COUNTER),
    help="Reserved for a job without maxTotalTokens (budgets with a token limit).",
)
@option("--refuse-unpriced", is_flag=True, help="Refuse jobs whose spec allows unpriced models.")
@with_db
def set_budget(
    name: str,
    selector: tuple[str, ...],
    limit_usd: str,
    limit_tokens: int | None,
    period: str,
    time_zone: str,
    action: str,
    soft: str,
    default_reservation_usd: str,
    default_reservation_tokens: int | None,
    refuse_unpriced: bool,
    database_url: str | None,
    data_dir: Path | None,
) -> None:
    """Create or change budget NAME; jobs it held are looked at again at once."""
    if not 1 <= len(name) <= 256 or "\x00" in name:
        raise ConfigError("NAME: 1 to 256 characters, no NUL")
    store.check_time_zone(time_zone)
    budget = store.Budget(
        name=name,
        selector=selector_of(selector),
        limit_usd=_decimal("--limit-usd", limit_usd, Decimal(0), USD_MAX),
        limit_tokens=limit_tokens,
        period=period,  # type: ignore[arg-type]
        time_zone=time_zone,
        action=action,  # type: ignore[arg-type]
        soft_ratio=_decimal("--soft", soft, Decimal("0.01"), Decimal(1)),
        default_reservation_usd=_decimal(
            "--default-reservation-usd", default_reservation_usd, Decimal("1e-9"), USD_MAX
        ),
        default_reservation_tokens=default_reservation_tokens,
        refuse_unpriced=refuse_unpriced,
    )

    async def run(dsn: str) -> None:
        async with connection(dsn) as conn:
            try:
                await store.upsert(conn, budget)
            except asyncpg.CheckViolationError as exc:
                # The database's own checks (migration 0014): a zone its tz database lacks.
                constraint = str(getattr(exc, "constraint_name", None) or "a check")
                what = f"--time-zone {time_zone!r}" if "time_zone" in constraint else "budget"
                raise ConfigError(f"{what}: refused by the database ({constraint})") from None

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        asyncio.run(run(dsn))
    click.echo(f"budget {name} set")


@budgets.command("list")
@option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@with_db
def list_budgets(fmt: str, database_url: str | None, data_dir: Path | None) -> None:
    """Every budget: spent, reserved and remaining in its period, and its next reset."""

    async def run(dsn: str) -> list[store.Standing]:
        async with connection(dsn) as conn:
            return await store.report(conn, datetime.now(UTC))

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        standings = asyncio.run(run(dsn))
    records = [store.standing_record(s) for s in standings]
    if fmt != "table":
        print_records(records, fmt)
        return
    table = Table(title=f"{len(records)} budgets")
    columns = ("name", "selector", "period", "action", "limit", "spent", "reserved")
    for column in (*columns, "remaining", "held", "next reset"):
        table.add_column(column, overflow="fold")
    for r, s in zip(records, standings, strict=True):
        selector = ",".join(f"{k}={v}" for k, v in r["selector"].items()) or "*"
        unpriced = f" (+{s.unpriced_calls} unpriced calls)" if s.unpriced_calls else ""
        table.add_row(
            r["name"],
            selector,
            r["period"] if r["timeZone"] == "UTC" else f"{r['period']} ({r['timeZone']})",
            r["action"],
            f"${s.budget.limit_usd}",
            f"${s.spent_usd:.6f}{unpriced}",
            f"${s.reserved_usd:.6f}",
            f"${s.room_usd:.6f}",
            str(s.held),
            r["nextReset"] or "never",
        )
    Console(width=220).print(table)


@budgets.command("delete")
@click.argument("name")
@with_db
def delete_budget(name: str, database_url: str | None, data_dir: Path | None) -> None:
    """Remove budget NAME; the jobs it held are looked at again at once."""

    async def run(dsn: str) -> bool:
        async with connection(dsn) as conn:
            return await store.delete(conn, name)

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        if not asyncio.run(run(dsn)):
            raise ConfigError(f"no budget {name}")
    click.echo(f"budget {name} deleted")

"""``tally migrate up|status|verify``: the ledger's SQL migrations."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from orchestrator.cli.common import data_dir_option, database_url_option
from orchestrator.local.embedded import resolve_database
from orchestrator.store import migrations
from orchestrator.store.db import connection
from shared.errors import MigrationError
from shared.settings import option


@click.group()
def migrate() -> None:
    """Apply, list and verify the ledger's SQL migrations."""


migrations_dir_option = option(
    "--migrations-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Folder of NNNN_name.sql files (default: the ones shipped with Tally).",
)


@migrate.command("up")
@database_url_option
@data_dir_option
@migrations_dir_option
@option("--to", type=click.IntRange(min=1), default=None, help="Stop after this version.")
@option("--dry-run", is_flag=True, help="List what would be applied, apply nothing.")
def migrate_up(
    database_url: str | None,
    data_dir: Path | None,
    migrations_dir: Path | None,
    to: int | None,
    dry_run: bool,
) -> None:
    """Apply pending migrations under an advisory lock."""
    files = migrations.discover(migrations_dir)

    async def run(dsn: str) -> list[migrations.Migration]:
        async with connection(dsn) as conn:
            return await migrations.up(conn, files, to=to, dry_run=dry_run)

    with resolve_database(database_url, data_dir) as (dsn, _):
        applied = asyncio.run(run(dsn))
    verb = "would apply" if dry_run else "applied"
    for m in applied:
        click.echo(f"{verb} {m.filename}")
    if not applied:
        click.echo("schema is current; nothing to apply")


@migrate.command("status")
@database_url_option
@data_dir_option
@migrations_dir_option
@option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def migrate_status(
    database_url: str | None, data_dir: Path | None, migrations_dir: Path | None, as_json: bool
) -> None:
    """List applied and pending migrations, one per line."""
    st = _status(database_url, data_dir, migrations_dir)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "applied": [
                        {
                            "version": a.version,
                            "name": a.name,
                            "checksum": a.checksum,
                            "appliedAt": a.applied_at.isoformat(),
                        }
                        for a in st.applied
                    ],
                    "pending": [{"version": m.version, "name": m.name} for m in st.pending],
                    "problems": st.problems,
                    "current": st.current,
                }
            )
        )
        return
    for a in st.applied:
        click.echo(f"applied  {a.version:04d}_{a.name}.sql  {a.applied_at:%Y-%m-%d %H:%M:%S%z}")
    for m in st.pending:
        click.echo(f"pending  {m.filename}")
    for problem in st.problems:
        click.echo(f"PROBLEM  {problem}")
    click.echo("schema is current" if st.current else "schema is NOT current")


@migrate.command("verify")
@database_url_option
@data_dir_option
@migrations_dir_option
def migrate_verify(
    database_url: str | None, data_dir: Path | None, migrations_dir: Path | None
) -> None:
    """Exit 0 only when the schema is exactly current and untampered."""
    st = _status(database_url, data_dir, migrations_dir)
    if not st.current:
        details = st.problems + [f"{m.filename} is pending" for m in st.pending]
        raise MigrationError("schema is not current: " + "; ".join(details))
    click.echo(f"schema is current ({len(st.applied)} migrations, checksums match)")


def _status(
    database_url: str | None, data_dir: Path | None, migrations_dir: Path | None
) -> migrations.MigrationStatus:
    """The applied and pending migrations of a database (for status and verify)."""
    files = migrations.discover(migrations_dir)

    async def run(dsn: str) -> migrations.MigrationStatus:
        async with connection(dsn) as conn:
            return await migrations.status(conn, files)

    with resolve_database(database_url, data_dir) as (dsn, _):
        return asyncio.run(run(dsn))

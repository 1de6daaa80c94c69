"""The ``tally`` command: serve, migrate, submit, jobs, usage, ledger, prune, up, bench."""

from __future__ import annotations

import sys

import click

from shared.errors import ConfigError, SchemaMismatchError, StoreError, TallyError
from shared.settings import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tally-ledger", prog_name="tally")
def cli() -> None:
    """Tally: run LLM agent jobs on a fleet of workers with an exact ledger of their cost."""


def _register_commands() -> None:
    from orchestrator.cli import bench, budgets, jobs, ledger, migrate, serve, submit, up, usage

    cli.add_command(serve.serve)
    cli.add_command(migrate.migrate)
    cli.add_command(bench.bench)
    cli.add_command(submit.submit)
    cli.add_command(jobs.jobs)
    cli.add_command(usage.usage)
    cli.add_command(ledger.ledger)
    cli.add_command(ledger.prune)
    cli.add_command(up.up)
    cli.add_command(budgets.budgets)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``tally``."""
    _register_commands()
    sys.exit(run_cli(cli, "tally", argv, explain))


def explain(exc: Exception) -> TallyError | None:
    """What a database or TLS failure means for the person at the terminal."""
    import ssl

    import asyncpg

    if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError):
        return SchemaMismatchError(
            f"the database has no current Tally schema ({exc}): run `tally migrate up`"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"the database refused the request: {type(exc).__name__}: {exc}")
    if isinstance(exc, ssl.SSLError):
        return ConfigError(f"TLS: {exc}")
    return None

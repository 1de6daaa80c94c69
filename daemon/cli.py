"""The ``tallyd`` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from daemon.config import DaemonSettings
from daemon.executors import parse_executor_flag
from daemon.pricing import EMPTY, load_prices
from shared.errors import ConfigError
from shared.locks import exclusive
from shared.output import DEFAULT_MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES
from shared.settings import (
    configure_logging,
    log_format_option,
    log_level_option,
    option,
    parse_labels,
    run_cli,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tally-ledger", prog_name="tallyd")
@option("--orchestrator", required=True, help="ws(s)://HOST:PORT/ws of the orchestrator.")
@option("--token", help="Daemon token (Authorization: Bearer).")
@option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CA bundle to verify a wss:// orchestrator.",
)
@option(
    "--executor",
    "executors",
    multiple=True,
    envvar="TALLY_EXECUTORS",
    help="NAME or NAME=JSON config; repeat for several (default: simulated).",
)
@option(
    "--max-concurrent-jobs",
    type=click.IntRange(min=1, max=10_000),
    default=4,
    show_default=True,
    help="Jobs run at once.",
)
@option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".local" / "state" / "tallyd",
    show_default=True,
    help="Where the outbox and the daemon id live.",
)
@option("--daemon-id", help="Stable daemon id (default: generated once, kept in the state dir).")
@option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to let running jobs finish on SIGTERM.",
)
@option(
    "--max-outbox-frames",
    type=click.IntRange(min=100),
    default=100_000,
    show_default=True,
    help="Unacknowledged frames kept; at the bound new offers are rejected busy, none dropped.",
)
@option("--label", "labels", multiple=True, help="KEY=VALUE label advertised to the orchestrator.")
@option(
    "--prices",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file of price overrides (USD per million tokens per model), used before the "
    "genai-prices table.",
)
@option(
    "--max-output-bytes",
    type=click.IntRange(min=1024, max=MAX_OUTPUT_BYTES),
    default=DEFAULT_MAX_OUTPUT_BYTES,
    show_default=True,
    help="A job's answer is cut to this many bytes (as JSON) in its result, and flagged as "
    "cut; keep it well under the orchestrator's --max-frame-bytes.",
)
@log_level_option()
@log_format_option()
def tallyd(
    orchestrator: str,
    token: str | None,
    ca_file: Path | None,
    executors: tuple[str, ...],
    max_concurrent_jobs: int,
    state_dir: Path,
    daemon_id: str | None,
    drain_timeout: float,
    max_outbox_frames: int,
    labels: tuple[str, ...],
    prices: Path | None,
    max_output_bytes: int,
    log_level: str,
    log_format: str,
) -> int:
    """Run a Tally worker daemon."""
    configure_logging(log_level, log_format)
    if not orchestrator.startswith(("ws://", "wss://")):
        raise ConfigError(f"--orchestrator {orchestrator!r}: expected ws://HOST:PORT/ws or wss://")
    parsed = dict(parse_executor_flag(e) for v in executors for e in _split(v)) or {"simulated": {}}
    settings = DaemonSettings(
        orchestrator=orchestrator,
        token=token,
        state_dir=state_dir,
        executors=parsed,
        max_concurrent_jobs=max_concurrent_jobs,
        daemon_id=daemon_id,
        ca_file=ca_file,
        drain_timeout=drain_timeout,
        max_outbox_frames=max_outbox_frames,
        labels=parse_labels(labels),
        prices=load_prices(prices) if prices is not None else EMPTY,
        max_output_bytes=max_output_bytes,
    )
    from daemon.worker import Worker

    # Two daemons on one state directory would share a daemon id and an outbox.
    with exclusive(state_dir, "tallyd.lock", "tallyd"):
        return asyncio.run(Worker(settings).run())


def _split(value: str) -> list[str]:
    # The env mirror may hold several executors separated by ';' (JSON holds commas).
    return [part for part in value.split(";") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``tallyd``."""
    sys.exit(run_cli(tallyd, "tallyd", argv))


__all__ = ["main"]

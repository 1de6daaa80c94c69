"""``tally bench``: reproducible benchmarks printing one JSON object per run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from orchestrator.cli.common import with_db
from shared.settings import option


@click.group()
def bench() -> None:
    """Benchmarks (decode, ingest, jobs, report, api); each prints one JSON object."""


@bench.command("decode")
@option("--n", "n", type=click.IntRange(min=1000), default=200_000, help="Frames per decoder.")
def bench_decode(n: int) -> None:
    """Frames decoded and validated per second, beside a strict pydantic v2 model."""
    from orchestrator.bench import decode as mod

    click.echo(json.dumps(mod.run(n)))


@bench.command("ingest")
@option("--connections", type=click.IntRange(min=1, max=1000), default=20, help="Daemon links.")
@option("--results", type=click.IntRange(min=1), default=20_000, help="Results to stream.")
@option(
    "--otlp-endpoint",
    "bench_otlp_endpoint",
    envvar="TALLY_BENCH_OTLP_ENDPOINT",
    help="Run the server with the OTLP export to this URL (a closed port: the receiver down).",
)
@with_db
def bench_ingest(
    connections: int,
    results: int,
    bench_otlp_endpoint: str | None,
    database_url: str | None,
    data_dir: Path | None,
) -> None:
    """Durable-and-acknowledged results/s and ack latency, beside raw COPY of the same rows."""
    from orchestrator.bench import ingest as mod

    summary = mod.run(connections, results, database_url, data_dir, bench_otlp_endpoint)
    click.echo(json.dumps(asyncio.run(summary)))


@bench.command("jobs")
@option("--jobs", "n_jobs", type=click.IntRange(min=1), default=2000, help="Jobs to run.")
@option("--daemons", type=click.IntRange(min=1, max=64), default=4, help="Daemon processes.")
@with_db
def bench_jobs(n_jobs: int, daemons: int, database_url: str | None, data_dir: Path | None) -> None:
    """Full round trips per second with a zero-latency simulated executor."""
    from orchestrator.bench import jobs as mod

    click.echo(json.dumps(asyncio.run(mod.run(n_jobs, daemons, database_url, data_dir))))


@bench.command("report")
@option(
    "--executions",
    type=click.IntRange(min=1000, max=20_000_000),
    default=100_000,
    show_default=True,
    help="Executions to seed (10 calls each).",
)
@with_db
def bench_report(executions: int, database_url: str | None, data_dir: Path | None) -> None:
    """Each report form's time (in process and through the usage API) on a seeded ledger."""
    from orchestrator.bench import report as mod

    click.echo(json.dumps(asyncio.run(mod.run(executions, database_url, data_dir))))


@bench.command("api")
@option(
    "--requests",
    type=click.IntRange(min=1, max=2000),
    default=200,
    show_default=True,
    help="Usage API requests in flight at every moment while the jobs run.",
)
@option(
    "--jobs",
    "n_jobs",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Jobs to run.",
)
@option(
    "--daemons",
    type=click.IntRange(min=1, max=64),
    default=2,
    show_default=True,
    help="Daemon processes (32 slots each).",
)
@option(
    "--executions",
    type=click.IntRange(min=1000, max=20_000_000),
    default=20_000,
    show_default=True,
    help="Executions to seed the ledger with (10 calls each, over 30 days) before the run.",
)
@option(
    "--latency-ms",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Latency of each simulated call (two per job).",
)
@with_db
def bench_api(
    requests: int,
    n_jobs: int,
    daemons: int,
    executions: int,
    latency_ms: int,
    database_url: str | None,
    data_dir: Path | None,
) -> None:
    """Usage API latency under heavy concurrent reports while jobs run; lost and re-run
    executions (must be 0)."""
    from orchestrator.bench import api as mod

    summary = mod.run(requests, n_jobs, daemons, executions, latency_ms, database_url, data_dir)
    click.echo(json.dumps(asyncio.run(summary)))

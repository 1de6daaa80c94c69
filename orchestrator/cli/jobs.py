"""``tally jobs``, ``tally jobs show`` and ``tally jobs cancel``: recent jobs; one job with its
executions and calls; cancelling."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any, get_args

import click
from rich.console import Console
from rich.table import Table

from orchestrator.cli.common import with_db
from orchestrator.local.embedded import resolve_database
from orchestrator.store import reports
from orchestrator.store.db import connection
from orchestrator.store.job_detail import JobDetail, job_detail, job_document, job_output, timeline
from orchestrator.store.jobs import CANCEL_JOB
from shared.errors import ConfigError, TallyError
from shared.limits import JobState
from shared.settings import command_option, parse_labels

jobs_option = command_option("jobs")


def print_records(rows: list[dict[str, Any]], fmt: str) -> None:
    """Rows as a JSON array or CSV (unknown values empty), for scripts."""
    data = [reports.plain(r) for r in rows]
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    buffer = io.StringIO()
    fields = list(data[0]) if data else ["id"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in data:
        writer.writerow(
            {
                k: "" if v is None else json.dumps(v) if isinstance(v, dict) else v
                for k, v in r.items()
            }
        )
    click.echo(buffer.getvalue(), nl=False)


def _status(r: Any) -> str:
    """A job's status, with why a queued job is not running."""
    if r["status"] == "queued" and r["hold_reason"]:
        return f"queued (held: {r['hold_reason']})"
    if r["waiting_for_executor"]:
        return "queued (waiting for an executor)"
    return str(r["status"])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""  # unknown
    return json.dumps(value) if isinstance(value, dict | list) else value


def _fmt_int(value: object) -> str:
    """A count, or ``unknown`` when it was not reported (never shown as 0)."""
    return "unknown" if value is None else f"{int(value):,}"  # type: ignore[call-overload]


def _fmt_cost(value: object, unpriced: int = 0) -> str:
    """A cost: ``unpriced`` when unknown, a lower bound when some calls had no price."""
    if value is None:
        return "unpriced"
    text = f"{float(value):,.6f}"  # type: ignore[arg-type]
    return f">= {text} ({unpriced} unpriced calls)" if unpriced else text


@click.group(invoke_without_command=True)
@with_db
@jobs_option(
    "--status",
    type=click.Choice(list(get_args(JobState))),
    help="Only jobs in this status.",
)
@jobs_option("--executor", help="Only jobs of this executor.")
@jobs_option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@jobs_option("--label", "labels", multiple=True, help="KEY=VALUE; repeat to require several.")
@jobs_option(
    "--limit",
    type=click.IntRange(min=1, max=100_000),
    default=50,
    show_default=True,
    help="How many jobs.",
)
@click.pass_context
def jobs(
    ctx: click.Context,
    database_url: str | None,
    data_dir: Path | None,
    status: str | None,
    executor: str | None,
    labels: tuple[str, ...],
    limit: int,
    fmt: str,
) -> None:
    """Recent jobs (newest first); `tally jobs show ID` for one job in detail."""
    ctx.obj = (database_url, data_dir)
    if ctx.invoked_subcommand is not None:
        return
    wanted = parse_labels(labels)

    async def run(dsn: str) -> list[Any]:
        async with connection(dsn) as conn:
            return await reports.recent_jobs(conn, status, executor, wanted, limit)

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        rows = asyncio.run(run(dsn))
    if fmt != "table":
        print_records([dict(r) for r in rows], fmt)
        return
    table = Table(title=f"{len(rows)} most recent jobs")
    for name in (
        "id",
        "status",
        "executor",
        "model",
        "attempts",
        "input",
        "cache read",
        "output",
        "cost (USD)",
        "created",
    ):
        table.add_column(
            name,
            justify="right"
            if name in ("attempts", "input", "cache read", "output", "cost (USD)")
            else "left",
            overflow="fold",
        )
    for r in rows:
        table.add_row(
            str(r["id"]),
            _status(r),
            r["executor"],
            r["model"] or "-",
            str(r["attempts"]),
            _fmt_int(r["input_tokens"]),
            _fmt_int(r["cache_read_input_tokens"]),
            _fmt_int(r["output_tokens"]),
            _fmt_cost(r["cost_usd"], r["unpriced_calls"]),
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}",
        )
    Console(width=220).print(table)


@jobs.command("show")
@click.argument("job_id")
@with_db
@jobs_option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.pass_context
def jobs_show(
    ctx: click.Context, job_id: str, database_url: str | None, data_dir: Path | None, fmt: str
) -> None:
    """One job with its executions and calls (JOB_ID: the id or its first characters)."""
    # The database options may come before `show` (on `tally jobs`) or after it.
    database_url = database_url or ctx.obj[0]
    data_dir = data_dir or ctx.obj[1]

    async def run(dsn: str):  # type: ignore[no-untyped-def]
        async with connection(dsn) as conn:
            full_id = await reports.resolve_job_id(conn, job_id)
            return await job_detail(conn, full_id)

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        detail = asyncio.run(run(dsn))
    job, executions = detail.job, detail.executions
    if job is None:
        raise ConfigError(f"no job {job_id}")
    if fmt == "json":
        click.echo(json.dumps(job_document(detail), indent=2, ensure_ascii=False))
        return
    console = Console(width=220)
    console.print(
        f"[bold]job {job['id']}[/bold]  {job['status']}  executor={job['executor']}  "
        f"model={job['model'] or '-'}  attempts={job['attempts']}/{job['max_attempts']}"
    )
    console.print(
        f"labels={json.loads(job['labels'])}  "
        f"stop={job['stop_reason'] or '-'}  error={job['error'] or '-'}"
    )
    if job["detail_pruned_at"] is not None:
        console.print(f"detail pruned at {job['detail_pruned_at']:%Y-%m-%d %H:%M:%S}: totals only")
    console.print(
        f"tokens: input={_fmt_int(job['input_tokens'])} "
        f"cache_read={_fmt_int(job['cache_read_input_tokens'])} "
        f"cache_write={_fmt_int(job['cache_creation_input_tokens'])} "
        f"output={_fmt_int(job['output_tokens'])} "
        f"reasoning={_fmt_int(job['reasoning_tokens'])} "
        f"cost={_fmt_cost(job['cost_usd'], job['unpriced_calls'])}"
    )
    et = Table(title="executions")
    for name in (
        "id",
        "attempt",
        "daemon",
        "status",
        "stop",
        "failure",
        "turns",
        "input",
        "output",
        "cost",
        "error",
    ):
        et.add_column(name, overflow="fold")
    for e in executions:
        et.add_row(
            str(e["id"]),
            str(e["attempt"]),
            e["daemon_id"],
            e["status"],
            e["stop_reason"] or "-",
            e["error_class"] or "-",
            _fmt_int(e["num_turns"]),
            _fmt_int(e["input_tokens"]),
            _fmt_int(e["output_tokens"]),
            _fmt_cost(e["cost_usd"], e["unpriced_calls"]),
            e["error"] or "",
        )
    console.print(et)
    console.print(timeline_table(detail))
    answer = job_output(executions)
    if answer is not None:
        value = answer["value"]
        text = value if isinstance(value, str) else json.dumps(value, indent=2)
        cut = " (cut to the orchestrator's --max-output-bytes)" if answer["truncated"] else ""
        console.print(f"[bold]output[/bold]{cut}:", highlight=False)
        console.print(text, markup=False, highlight=False)


def timeline_table(detail: JobDetail) -> Table:
    """Calls and tool calls in the order they happened, so a person sees where time went."""
    ct = Table(title="calls and tool calls")
    for name in (
        "execution",
        "step",
        "kind",
        "provider / tool",
        "model / sizes",
        "finish",
        "input",
        "cache read",
        "cache write",
        "output",
        "reasoning",
        "cost",
        "ms",
    ):
        ct.add_column(name, overflow="fold")
    for kind, r in timeline(detail):
        ms = f"{r['duration_ms']:.0f}" if r["duration_ms"] is not None else "-"
        if kind == "tool":
            sizes = f"args {r['arguments_bytes']} B, result {r['result_bytes']} B"
            ct.add_row(
                str(r["execution_id"])[:8],
                f"tool {r['seq']}",
                "tool",
                r["name"],
                sizes,
                "error" if r["error"] else "ok",
                *([""] * 6),
                ms,
            )
            continue
        ct.add_row(
            str(r["execution_id"])[:8],
            f"call {r['seq']}",
            "llm",
            r["provider"],
            r["response_model"] or r["request_model"] or "-",
            r["finish_reason"] or "-",
            _fmt_int(r["input_tokens"]),
            _fmt_int(r["cache_read_input_tokens"]),
            _fmt_int(r["cache_creation_input_tokens"]),
            _fmt_int(r["output_tokens"]),
            _fmt_int(r["reasoning_tokens"]),
            str(r["cost_usd"]) if r["cost_usd"] is not None else "unpriced",
            ms,
        )
    return ct


@jobs.command("cancel")
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB_ID...")
@with_db
@click.pass_context
def jobs_cancel(
    ctx: click.Context, job_ids: tuple[str, ...], database_url: str | None, data_dir: Path | None
) -> None:
    """Cancel jobs: a queued one at once, a running one on its daemon (its usage so far stays
    recorded). Exit 1 when a job had already finished otherwise."""
    database_url = database_url or ctx.obj[0]
    data_dir = data_dir or ctx.obj[1]

    async def run(dsn: str) -> list[tuple[str, str, bool]]:
        out = []
        async with connection(dsn) as conn:
            ids = [await reports.resolve_job_id(conn, prefix) for prefix in job_ids]
            known = {
                str(r["id"])
                for r in await conn.fetch("SELECT id FROM jobs WHERE id = ANY($1::uuid[])", ids)
            }
            missing = [job_id for job_id in ids if job_id not in known]
            if missing:  # nothing is cancelled when any id is wrong
                raise ConfigError(f"no job {missing[0]}")
            for job_id in dict.fromkeys(ids):
                status = await conn.fetchval(CANCEL_JOB, job_id)
                if status is not None:
                    out.append((job_id, str(status), True))
                    continue
                final = await conn.fetchval("SELECT status FROM jobs WHERE id = $1::uuid", job_id)
                out.append((job_id, str(final), False))
        return out

    with resolve_database(database_url, data_dir, create=False) as (dsn, _):
        results = asyncio.run(run(dsn))
    refused = []
    for job_id, status, changed in results:
        if changed and status == "cancelled":
            click.echo(f"{job_id} cancelled")
        elif changed:
            click.echo(f"{job_id} cancel requested: its daemon stops it (usage so far is kept)")
        elif status == "cancelled":
            click.echo(f"{job_id} already cancelled")
        else:
            refused.append(f"{job_id} already {status}")
    if refused:
        raise TallyError("not cancelled: " + ", ".join(refused))
